"""Several streams through one frame loop (engine.max_batch > 1): exactness, joining, leaving, faults.

Every frame of a batching engine runs at ``max_batch`` rows (padding the slots nobody uses), so a stream's
row goes through the same kernels whoever else is in the batch: a stream beside others gives, bit for bit,
the codes it gives alone in the same engine, in float32 and in bf16, on any CPU. Against the one-stream
engine (one row) the products may round differently (CPU BLAS takes a matrix-vector kernel for one row and
blocked kernels for several; some CPUs take AMX tiles for bf16), so there the teacher-forced logits are
compared, to 1e-5 in float32.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from companion.engine import Engine, GenerationOptions, Segment
from companion.engine.errors import EngineBusy
from companion.engine.sampling import Sampler

GREEDY = GenerationOptions(temperature=0.0, max_frames=48)
SAMPLED = GenerationOptions(temperature=0.9, topk=50, seed=11, max_frames=48)
TEXT = "I am the one stream this test watches."
OTHERS = ["A second voice joins a little later.", "Then a third, with numbers: 1, 2, 3.", "The fourth one is short."]
OTHER_FRAMES = [20, 35, 12]  # the others leave at different frames


@pytest.fixture(scope="module")
def bf16_model(tiny_model_dir: Path) -> Engine:
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", max_seq_len=256)


def engine_of(base: Engine, max_batch: int) -> Engine:
    return Engine(base.model, base.processor, "batch", max_seq_len=256, max_batch=max_batch)


@pytest.fixture(scope="module")
def reference(tiny_engine: Engine, speech_24k) -> list[Segment]:
    return [Segment(0, "This is how I sound.", tiny_engine.encode(speech_24k("narrator.mp3", 1.0)))]


def codes_of(engine: Engine, context: list[Segment], text: str, options: GenerationOptions) -> torch.Tensor:
    return torch.cat([c.codes for c in engine.stream(context, 0, text, options)], dim=1)


def together(engine: Engine, jobs: list[Callable[[], torch.Tensor]], raising: bool = True) -> list:
    """Run ``jobs`` each in its own thread, job i starting once job i - 1 has ended or got its first
    chunk (so they join the frame loop at different frames); return their results, an exception as
    itself (re-raised unless ``raising`` is False)."""
    results: list[object] = [None] * len(jobs)
    started = [threading.Event() for _ in jobs]

    def run(i: int) -> None:
        if i:
            started[i - 1].wait()
        try:
            results[i] = jobs[i](started[i]) if _takes_flag(jobs[i]) else jobs[i]()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            results[i] = err
        finally:
            started[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    for r in results:
        if raising and isinstance(r, BaseException):
            raise r
    return results


def _takes_flag(job: Callable) -> bool:
    return getattr(job, "takes_flag", False)


class Job:
    """One stream's codes; the flag it is given is set once its first chunk arrived."""

    takes_flag = True

    def __init__(self, engine: Engine, context: list[Segment], text: str, options: GenerationOptions,
                 cancel: threading.Event | None = None) -> None:  # fmt: skip
        self.args = (engine, context, text, options, cancel)

    def __call__(self, flag: threading.Event) -> torch.Tensor:
        engine, context, text, options, cancel = self.args
        chunks = []
        for chunk in engine.stream(context, 0, text, options, cancel):
            chunks.append(chunk.codes)
            flag.set()
        return torch.cat(chunks, dim=1) if chunks else torch.zeros(0, 0, dtype=torch.long)


def four_streams(engine: Engine, context: list[Segment], options: GenerationOptions,
                 watched: Callable[[], torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """The watched stream first, then three others joining one after another and leaving earlier."""
    first = watched or Job(engine, context, TEXT, options)
    jobs = [first] + [
        Job(engine, context, t, GenerationOptions(0.9, 50, seed=100 + n, max_frames=n))
        for t, n in zip(OTHERS, OTHER_FRAMES, strict=True)
    ]
    return together(engine, jobs)


# ---- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_stream_beside_three_others_gives_its_codes_alone(tiny_engine, bf16_model, reference, options,
                                                            dtype) -> None:  # fmt: skip
    model = tiny_engine if dtype == "float32" else bf16_model
    others = [GenerationOptions(0.9, 50, seed=100 + n, max_frames=n) for n in OTHER_FRAMES]

    def twice_alone(text: str, opts: GenerationOptions) -> list[torch.Tensor]:
        """A stream alone on its own engine of four, twice: the second time its slot holds its prefix
        (the last prompt position is prefilled again on its own, which on some CPUs rounds otherwise than
        within the first prefill's chunk: prefix reuse is compared with itself, not with a fresh cache)."""
        alone_engine = engine_of(model, 4)
        return [codes_of(alone_engine, reference, text, opts) for _ in range(2)]

    alone = twice_alone(TEXT, options)
    others_alone = [twice_alone(t, o) for t, o in zip(OTHERS, others, strict=True)]
    engine = engine_of(model, 4)
    for round_ in range(2):  # the second time every slot holds a prefix from the first
        got = four_streams(engine, reference, options)
        assert torch.equal(got[0], alone[round_]) and alone[round_].shape[1] == 48
        assert all(torch.equal(g, a[round_]) for g, a in zip(got[1:], others_alone, strict=True))
    assert engine.batcher is not None and engine.batcher.active == 0  # they left when they ended


class Teacher(Sampler):
    """Feeds the given codes `(F, K)` instead of sampling, and keeps the logits it was shown."""

    def __init__(self, base: Sampler, codes: torch.Tensor) -> None:
        self.__dict__.update(base.__dict__)
        self.forced, self.frame, self.logits = codes, -1, []  # type: ignore[var-annotated]

    def begin_frame(self) -> None:
        super().begin_frame()
        self.frame += 1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits[0].float().clone())
        code = self.forced[self.frame, len(self.logits) - 1 - self.frame * self.forced.shape[1]]
        return code.view(1).to(logits.device)


def teacher_forced_logits(engine: Engine, context, codes: torch.Tensor, beside_others: bool) -> torch.Tensor:
    """The logits the watched stream's frames were chosen from, fed ``codes``, alone or beside three others."""
    assert engine.batcher is not None
    made: list[Teacher] = []
    plain = engine.batcher.make_sampler

    def make(options: GenerationOptions) -> Sampler:
        if options.max_frames != codes.shape[0]:
            return plain(options)
        made.append(Teacher(plain(options), codes))
        return made[-1]

    engine.batcher.make_sampler = make
    try:
        opts = GenerationOptions(0.0, max_frames=codes.shape[0])
        if beside_others:
            four_streams(engine, context, opts)
        else:
            codes_of(engine, context, TEXT, opts)
    finally:
        engine.batcher.make_sampler = plain
    return torch.stack(made[0].logits)


def one_stream_logits(engine: Engine, context, codes: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The logits of the one-stream engine (no batcher) fed ``codes``: its sampler made a Teacher."""
    import companion.engine.engine as engine_module

    made: list[Teacher] = []

    def make(*args, **kwargs) -> Sampler:  # noqa: ANN002, ANN003
        made.append(Teacher(Sampler(*args, **kwargs), codes))
        return made[-1]

    with monkeypatch.context() as m:
        m.setattr(engine_module, "Sampler", make)
        codes_of(engine, context, TEXT, GenerationOptions(0.0, max_frames=codes.shape[0]))
    return torch.stack(made[0].logits)


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_float32_a_stream_beside_three_others_has_the_one_stream_engines_logits(tiny_engine, reference, options,
                                                                                monkeypatch) -> None:  # fmt: skip
    """In float32 the logits of every codebook of 48 frames, fed the codes the one-stream engine chose, are
    that engine's to 1e-5 (one row and four rows round differently), and bit for bit the same stream's
    alone in an engine of four."""
    one = engine_of(tiny_engine, 1)
    codes = codes_of(one, reference, TEXT, options).T.contiguous()  # (48, K)
    expected = one_stream_logits(one, reference, codes, monkeypatch)
    alone = teacher_forced_logits(engine_of(tiny_engine, 4), reference, codes, beside_others=False)
    beside = teacher_forced_logits(engine_of(tiny_engine, 4), reference, codes, beside_others=True)
    assert expected.shape == alone.shape == beside.shape == (48 * codes.shape[1], alone.shape[1])
    assert torch.equal(beside, alone)
    assert torch.allclose(beside, expected, rtol=0, atol=1e-5)


# ---- joining, leaving, slots ----------------------------------------------------------------------


def test_a_stream_beyond_max_batch_is_refused_naming_the_first(tiny_engine) -> None:
    engine = engine_of(tiny_engine, 2)
    first = engine.stream([], 0, "The first of two.", GREEDY)
    second = engine.stream([], 0, "The second of two.", GREEDY)
    next(first), next(second)
    assert engine.active_streams == 2
    with pytest.raises(EngineBusy, match="already speaking 2 streams .*'The first of two.'.*engine.max_batch"):
        engine.stream([], 0, "A third.", GREEDY)
    first.close()
    assert engine.active_streams == 1
    third = engine.stream([], 0, "A third.", GREEDY)
    assert next(third).codes.shape[1] == 2
    second.close(), third.close()
    assert engine.active_streams == 0


def test_a_conversation_that_comes_back_finds_its_prefix_in_its_slot(tiny_engine, reference) -> None:
    engine = engine_of(tiny_engine, 2)
    first = codes_of(engine, reference, "The first reply.", GenerationOptions(0.0, max_frames=6))
    context = [*reference, Segment(0, "The first reply.", first)]
    stranger = [Segment(1, "Somebody else entirely.", reference[0].codes[:, :5])]
    codes_of(engine, stranger, "Another conversation.", GREEDY)  # takes the other slot
    codes_of(engine, context, "The second reply.", GREEDY)
    # Read again: the first reply's last frame (the one frame not fed back), its end frame, the new text.
    assert engine.last_stats.prefill_positions == 2 + engine.text_positions(0, "The second reply.")
    # With one slot the stranger took it: everything is read again.
    one = engine_of(tiny_engine, 1)
    codes_of(one, reference, "The first reply.", GenerationOptions(0.0, max_frames=6))
    codes_of(one, stranger, "Another conversation.", GREEDY)
    codes_of(one, context, "The second reply.", GREEDY)
    assert one.last_stats.prefill_positions > one.last_stats.prompt_positions - 3


# ---- faults -----------------------------------------------------------------------------------------


class CancelAt(Sampler):
    """Sets ``cancel`` when frame ``at`` begins (in the frame loop: the cancel lands inside a frame's work)."""

    def __init__(self, base: Sampler, cancel: threading.Event, at: int) -> None:
        self.__dict__.update(base.__dict__)
        self.cancel, self.at, self.frame = cancel, at, 0

    def begin_frame(self) -> None:
        super().begin_frame()
        self.frame += 1
        if self.frame == self.at:
            self.cancel.set()


class FailAt(Sampler):
    """Raises while frame ``at`` is generated: the whole frame of every stream in it fails."""

    def __init__(self, base: Sampler, at: int) -> None:
        self.__dict__.update(base.__dict__)
        self.at, self.frame = at, 0

    def begin_frame(self) -> None:
        super().begin_frame()
        self.frame += 1
        if self.frame == self.at:
            raise RuntimeError("CUDA out of memory (a test's)")


@pytest.mark.parametrize("fault", ["cancel", "consumer raises", "hang-up"])
def test_one_stream_stopping_at_frame_5_leaves_the_other_three_exact(bf16_model, reference, fault) -> None:
    options = [GenerationOptions(0.9, 50, seed=20 + i, max_frames=24) for i in range(4)]
    texts = [TEXT, *OTHERS]
    alone = [codes_of(engine_of(bf16_model, 4), reference, t, o) for t, o in zip(texts, options, strict=True)]
    engine = engine_of(bf16_model, 4)
    assert engine.batcher is not None
    cancel = threading.Event()
    plain = engine.batcher.make_sampler
    if fault == "cancel":
        engine.batcher.make_sampler = lambda o: CancelAt(plain(o), cancel, 5) if o.seed == 21 else plain(o)

    def victim(flag: threading.Event) -> torch.Tensor:
        got = []
        stream = engine.stream(reference, 0, texts[1], options[1], cancel)
        for chunk in stream:
            got.append(chunk.codes)
            flag.set()
            if fault == "consumer raises" and sum(c.shape[1] for c in got) >= 6:
                raise KeyError("the consumer's own bug")  # the generator is dropped as the error unwinds
            if fault == "hang-up" and sum(c.shape[1] for c in got) >= 6:
                stream.close()  # what a server does when its client hangs up
                break
        return torch.cat(got, dim=1)

    victim.takes_flag = True  # type: ignore[attr-defined]
    jobs: list = [Job(engine, reference, texts[i], options[i]) for i in range(4)]
    jobs[1] = victim
    got = together(engine, jobs, raising=False)
    for i in (0, 2, 3):
        assert torch.equal(got[i], alone[i])
    if fault == "consumer raises":
        assert isinstance(got[1], KeyError)
    else:
        made = got[1].shape[1]
        assert made == (2 if fault == "cancel" else 6)  # cancel at frame 5: the chunk of frames 3-6 never comes
        assert torch.equal(got[1], alone[1][:, :made])
    # And afterwards every stream alone is exactly what it is on a fresh engine.
    engine.batcher.make_sampler = plain
    assert torch.equal(codes_of(engine, reference, texts[1], options[1]), alone[1])
    assert engine.batcher.active == 0


def test_a_frame_that_fails_fails_its_streams_and_the_next_ones_are_exact(tiny_engine, reference) -> None:
    engine = engine_of(tiny_engine, 4)
    assert engine.batcher is not None
    plain = engine.batcher.make_sampler
    engine.batcher.make_sampler = lambda o: FailAt(plain(o), 5) if o.seed == 100 + OTHER_FRAMES[0] else plain(o)
    with pytest.raises(RuntimeError, match="a test's"):
        four_streams(engine, reference, GREEDY)
    engine.batcher.make_sampler = plain
    assert engine.batcher.active == 0
    fresh = engine_of(tiny_engine, 4)
    for text in (TEXT, OTHERS[0]):
        assert torch.equal(codes_of(engine, reference, text, GREEDY), codes_of(fresh, reference, text, GREEDY))
