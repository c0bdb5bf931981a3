"""MLflow "model from code" for PERL's reward models and policies: no pickle in the registry."""
import mlflow

from flows.registry import PerlPyfunc


class PerlModel(PerlPyfunc, mlflow.pyfunc.PythonModel):
    pass


mlflow.models.set_model(PerlModel())
