"""batch_size: auto — the search, what counts as "does not fit", and a real tiny model's steps on CPU."""
from __future__ import annotations

import pytest

from llmcycle.core import memory
from llmcycle.core.errors import UserError
from llmcycle.training.batch_finder import find_batch_size, is_out_of_memory


class FakeMemory:
    """A step on n examples peaks at base + per_example * n MiB; measure() reads the last peak."""

    def __init__(self, base=100.0, per_example=30.0):
        self.base, self.per_example, self.peak, self.tried = base, per_example, 0.0, []

    def try_batch(self, n):
        self.tried.append(n)
        self.peak = self.base + self.per_example * n

    def measure(self):
        return self.peak


def test_doubling_then_bisection_finds_the_largest_batch_under_the_limit():
    fake = FakeMemory()
    size, trials = find_batch_size(fake.try_batch, start=1, ceiling=1000, limit_mb=400, measure=fake.measure)
    assert size == 10  # 100 + 30 * 10 = 400, exactly at the limit, fits; 11 does not
    assert trials == [{"batch_size": n, "fits": n <= 10, "peak_mb": 100.0 + 30 * n}
                      for n in (1, 2, 4, 8, 16, 12, 10, 11)]


def test_an_out_of_memory_error_means_the_batch_does_not_fit():
    def try_batch(n):
        if n > 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    size, trials = find_batch_size(try_batch, start=1, ceiling=64)
    assert size == 5
    assert [(t["batch_size"], t["fits"], t["peak_mb"]) for t in trials] == [
        (1, True, None), (2, True, None), (4, True, None), (8, False, None), (6, False, None), (5, True, None)]


def test_a_real_cpu_allocation_failure_is_recognised():
    torch = pytest.importorskip("torch")

    def try_batch(n):  # 2**60 bytes is beyond any address space: torch's CPU allocator refuses it
        torch.empty(2**60 if n > 3 else 8, dtype=torch.uint8)

    assert find_batch_size(try_batch, start=1, ceiling=64)[0] == 3


def test_which_errors_are_out_of_memory():
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error type


def test_any_other_error_propagates():
    def try_batch(n):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x16 and 8x16)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        find_batch_size(try_batch, start=1, ceiling=8)


def test_when_not_even_one_example_fits_the_user_is_told_what_to_do():
    fake = FakeMemory(base=500)
    with pytest.raises(UserError) as caught:
        find_batch_size(fake.try_batch, start=1, ceiling=100, limit_mb=400, measure=fake.measure)
    message = str(caught.value)
    assert "\n" not in message and "530 MiB over the 400 MiB limit" in message
    assert "gradient_checkpointing: true" in message and "lora" in message and "context window" in message
    assert fake.tried == [1]


def test_a_start_that_does_not_fit_is_bisected_down_from():
    fake = FakeMemory()
    size, trials = find_batch_size(fake.try_batch, start=16, ceiling=1000, limit_mb=400, measure=fake.measure)
    assert size == 10 and [t["batch_size"] for t in trials] == [16, 8, 12, 10, 11]


@pytest.mark.parametrize("start,ceiling,tried", [(1, 6, [1, 2, 4, 6]), (1, 1, [1]), (32, 6, [6])])
def test_never_above_the_ceiling(start, ceiling, tried):
    fake = FakeMemory()
    size, _ = find_batch_size(fake.try_batch, start=start, ceiling=ceiling, limit_mb=10_000, measure=fake.measure)
    assert size == ceiling and fake.tried == tried


def test_memory_is_freed_after_every_try(monkeypatch):
    released = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: released.append(1) or True)
    fake = FakeMemory()
    _, trials = find_batch_size(fake.try_batch, start=1, ceiling=1000, limit_mb=400, measure=fake.measure)
    assert len(released) == len(trials)


def test_bad_arguments_are_refused():
    fake = FakeMemory()
    with pytest.raises(ValueError, match="at least 1"):
        find_batch_size(fake.try_batch, start=0, ceiling=10)
    with pytest.raises(ValueError, match="needs measure"):
        find_batch_size(fake.try_batch, start=1, ceiling=10, limit_mb=400)


def test_peak_memory_reads_cuda_for_every_spelling_of_a_cuda_device(monkeypatch):
    torch = pytest.importorskip("torch")
    assert memory.peak_mb("cpu") > 0 and memory.peak_mb(None) > 0
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1.5 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    for device in (torch.device("cuda", 1), "cuda:0", "cuda"):
        assert memory.peak_mb(device) == 1.5 and memory.reset_peak(device) is True


def test_a_tiny_model_gets_the_largest_batch_whose_activations_fit(tmp_path):
    """Real forward and backward passes of a tiny GPT-2 on CPU. The measure is the bytes of the tensors
    autograd saves for the backward pass (counted by a hook, so exact and repeatable, unlike RSS); the
    limit sits between two sizes' measured figures, so the right answer is known in advance."""
    torch = pytest.importorskip("torch")
    from tiny import make_gpt2
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(make_gpt2(tmp_path / "gpt2")))
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(5, 300, (length,), generator=gen).tolist() for length in range(4, 44, 2)]
    longest = sorted(examples, key=len, reverse=True)
    saved = [0]

    def count(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def try_batch(n):
        rows = longest[:n]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
        saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def measure():
        return saved[0] / 2**20

    figures = {}
    for n in range(1, len(examples) + 1):
        try_batch(n)
        figures[n] = measure()
    assert all(figures[n] < figures[n + 1] for n in range(1, len(examples)))
    limit = (figures[7] + figures[8]) / 2
    size, trials = find_batch_size(try_batch, start=1, ceiling=len(examples), limit_mb=limit, measure=measure)
    assert size == 7
    assert [(t["batch_size"], t["fits"]) for t in trials] == [(1, True), (2, True), (4, True), (8, False),
                                                              (6, True), (7, True)]
    assert all(t["peak_mb"] == figures[t["batch_size"]] for t in trials)
    # With every example fitting, the ceiling (the size of the training set) is the answer.
    assert find_batch_size(try_batch, start=1, ceiling=len(examples), limit_mb=figures[len(examples)],
                           measure=measure)[0] == len(examples)
