"""The vLLM server's command line, without a server: the LoRA rank it is started with is one the
pinned vLLM accepts (its argparse refuses e.g. 4, and the server exits before it serves)."""
import pytest

from perl_core.errors import UserError
from perl_core.policy.vllm_engine import SERVED_LORA_RANKS, served_lora_rank


def test_the_served_lora_rank_is_the_smallest_accepted_that_holds_the_adapter():
    assert [served_lora_rank(r) for r in (1, 2, 4, 8, 9, 16, 33, 300, 512)] == [1, 8, 8, 8, 16, 16, 64, 320, 512]
    assert all(served_lora_rank(r) in SERVED_LORA_RANKS for r in range(1, 513))
    with pytest.raises(UserError, match=r"policy.lora.rank=600: the vLLM server holds adapters up to rank 512"):
        served_lora_rank(600)
