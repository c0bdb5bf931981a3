"""Reward models: one (`train`), an ensemble of them (`ensemble`), and the stage that picks (`stage`).

    train.py     losses, encoding and batching, training, saving, `RewardScorer`
    ensemble.py  N reward models trained alike, `EnsembleScorer` and its aggregations
    stage.py     the pipeline's entry: train one or an ensemble, read either's manifest, load either's scorer
"""
