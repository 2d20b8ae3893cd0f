"""Saved probes for resuming a job (saved_fits.FitCheckpoint): safetensors + JSON, never pickle."""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probe_sweep.fitting import saved_fits
from probe_sweep.probes.linear import FitResult, LinearProbe

CPU = torch.device("cpu")


def a_fit(map_weight: bool = True) -> FitResult:
    generator = torch.Generator().manual_seed(0)
    probe = LinearProbe(
        torch.randn(5, 4, generator=generator),
        torch.randn(5, generator=generator),
        torch.randn(4, generator=generator),
        1.7,
    )
    return FitResult(
        probe=probe,
        history=[{"epoch": 1, "train_loss": 2.5, "val_loss": None}],
        map_weight=torch.randn(4, 3, generator=generator) if map_weight else None,
        path=[{"strength": 1e-3, "val_nll": 1.25}],
        **(
            {"convergence": {"solver": "lbfgs", "iterations": 12, "converged": True, "gnorm": 1e-7}}
            if any(f.name == "convergence" for f in dataclasses.fields(FitResult))
            else {}
        ),
    )


def assert_same(got: FitResult, want: FitResult) -> None:
    assert isinstance(got, FitResult) and isinstance(got.probe, LinearProbe)
    for name, tensor in want.probe.state_dict().items():
        assert torch.equal(got.probe.state_dict()[name], tensor), name
    for spec in dataclasses.fields(FitResult):
        if spec.name == "probe":
            continue
        a, b = getattr(got, spec.name), getattr(want, spec.name)
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), spec.name
        else:
            assert a == b, spec.name


@pytest.mark.parametrize("map_weight", [True, False])
def test_a_fit_round_trips_through_safetensors(tmp_path: Path, map_weight: bool) -> None:
    fit = a_fit(map_weight)
    first = saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda _: fit)
    assert first is fit
    saved = tmp_path / ".fits" / "layer_0.safetensors"
    with safe_open(str(saved), "pt") as f:
        assert "probe.weight" in f.keys() and f.metadata()["type"].endswith("FitResult")

    def must_not_fit(_: object) -> FitResult:
        raise AssertionError("fitted again instead of reading the saved fit")

    resumed = saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", must_not_fit)
    assert resumed is not fit
    assert_same(resumed, fit)
    x = torch.randn(2, 4)
    assert torch.equal(resumed.probe(x), fit.probe(x))


MARKER_CODE = "open({marker!r}, 'w').close()"


class Payload:
    """Unpickling this runs code: what a crafted file in a job dir could do on resume."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (MARKER_CODE.format(marker=str(self.marker)),))


def test_a_crafted_pickle_in_the_fits_dir_is_never_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    fits = tmp_path / ".fits"
    fits.mkdir()
    (fits / "key").write_text("key")  # the right content key: the files would be resumed
    torch.save(Payload(marker), fits / "layer_0.pt")  # the old format, crafted
    torch.save(Payload(marker), fits / "layer_0.safetensors")  # a pickle under the new name
    caplog.set_level(logging.WARNING, logger="probe_sweep.fitting.saved_fits")
    fit = a_fit()
    got = saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda _: fit)
    assert got is fit, "the crafted file was read back as a fit"
    assert not marker.exists(), "loading a saved fit ran code from a pickle"
    refused = [r for r in caplog.records if "Refused saved probe" in r.getMessage()]
    assert len(refused) == 1, caplog.text
    # The refit replaced the crafted file, and reads back.
    assert_same(saved_fits.load_fit(fits / "layer_0.safetensors", FitResult), fit)
    assert not marker.exists()


def test_a_saved_fit_with_tensors_missing_is_refused_and_fitted_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda _: a_fit())
    path = tmp_path / ".fits" / "layer_0.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "probe.bias"}
    save_file(tensors, str(path), metadata=metadata)
    caplog.set_level(logging.WARNING, logger="probe_sweep.fitting.saved_fits")
    again = a_fit(map_weight=False)
    got = saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda _: again)
    assert got is again
    assert len([r for r in caplog.records if "Refused saved probe" in r.getMessage()]) == 1


def test_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "fit.safetensors"
    saved_fits.save_fit(path, a_fit())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(Exception):  # noqa: B017 (any failure to read means: refit)
        saved_fits.load_fit(path, FitResult)

    @dataclasses.dataclass
    class Other:
        weight: torch.Tensor

    saved_fits.save_fit(path, Other(torch.ones(2)))
    with pytest.raises(ValueError, match="not probe_sweep.probes.linear.FitResult"):
        saved_fits.load_fit(path, FitResult)


def tensor_offset(path: Path, name: str) -> int:
    """Where tensor ``name``'s bytes start in a safetensors file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    return 8 + size + header[name]["data_offsets"][0]


def flip_bit(path: Path, offset: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def refused(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Refused saved probe" in r.getMessage()]


@pytest.mark.parametrize(
    "byte, bit", [(0, 0), (3, 6)], ids=["mantissa-low-bit", "exponent-high-bit"]
)
def test_a_flipped_bit_in_a_saved_probe_is_refused_and_fitted_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, byte: int, bit: int
) -> None:
    """One flipped bit used to be resumed silently (the low bit) or crash the job later (an
    exponent bit: inf in the weights). The checksum refuses both; the refit is the clean fit."""
    saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda _: a_fit())
    path = tmp_path / ".fits" / "layer_0.safetensors"
    flip_bit(path, tensor_offset(path, "probe.weight") + byte, bit)
    caplog.set_level(logging.WARNING, logger="probe_sweep.fitting.saved_fits")
    got = saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda _: a_fit())
    [message] = refused(caplog)
    assert "checksum mismatch" in message and "fitting it again" in message
    assert_same(got, a_fit())
    assert_same(saved_fits.load_fit(path, FitResult), a_fit())  # the refit replaced it


def with_probe(**change: object) -> FitResult:
    fit = a_fit()
    state = {**fit.probe.state_dict(), **change}
    return dataclasses.replace(fit, probe=LinearProbe(**state))


CRAFTED = {
    "nan-weights": with_probe(weight=torch.full((5, 4), float("nan"))),
    "inf-mean": with_probe(mean=torch.tensor([1.0, float("inf"), 0.0, 0.0])),
    "scale-0": with_probe(scale=torch.tensor(0.0)),
    "bias-of-another-length": with_probe(bias=torch.zeros(3)),
    "convergence-a-string": dataclasses.replace(a_fit(), convergence="converged"),
    "history-with-nan": dataclasses.replace(a_fit(), history=[{"objective": float("nan")}]),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_saved_fit_with_a_valid_checksum_and_bad_values_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """A file written whole (its checksum matches) but holding what no fit produces: each of
    these ended in a traceback further on (JSON, eigh, matrix shapes, 'str'.get)."""
    checkpoint = saved_fits.FitCheckpoint(tmp_path, "key", CPU)
    path = tmp_path / ".fits" / "layer_0.safetensors"
    try:
        saved_fits.save_fit(path, CRAFTED[name])
    except ValueError:  # NaN in a record is not JSON: such a file can only be crafted
        assert name == "history-with-nan"
        return
    caplog.set_level(logging.WARNING, logger="probe_sweep.fitting.saved_fits")
    assert_same(checkpoint.get_or_fit("layer_0", lambda _: a_fit()), a_fit())
    assert len(refused(caplog)) == 1, caplog.text


def test_a_saved_fit_of_another_shape_than_the_jobs_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = saved_fits.FitCheckpoint(tmp_path, "key", CPU)
    checkpoint.get_or_fit("layer_0", lambda _: a_fit(), shape=(5, 4))
    caplog.set_level(logging.WARNING, logger="probe_sweep.fitting.saved_fits")
    wider = with_probe(weight=torch.zeros(5, 6), mean=torch.zeros(6))
    got = checkpoint.get_or_fit("layer_0", lambda _: wider, shape=(5, 6))
    assert got is wider
    [message] = refused(caplog)
    assert "(5, 4)" in message and "(5, 6)" in message


def test_huge_files_in_the_fits_dir_are_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1 GB sparse ``key`` used to be read whole (2.5 GB resident); a saved fit larger than
    any probe is refused by its size."""
    fits = tmp_path / ".fits"
    fits.mkdir()
    with open(fits / "key", "wb") as f:
        f.truncate(1 << 30)
    with open(fits / "layer_0.safetensors", "wb") as f:
        f.truncate(saved_fits.MAX_FIT_BYTES + 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checkpoint = saved_fits.FitCheckpoint(tmp_path, "key", CPU)
    assert not (fits / "layer_0.safetensors").exists(), "a dir of another key is dropped"
    assert (fits / "key").read_text() == "key"
    with open(fits / "layer_1.safetensors", "wb") as f:
        f.truncate(saved_fits.MAX_FIT_BYTES + 1)
    caplog.set_level(logging.WARNING, logger="probe_sweep.fitting.saved_fits")
    assert checkpoint.get_or_fit("layer_1", lambda _: a_fit()) is not None
    assert "more than a saved fit may take" in refused(caplog)[0]
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000, f"peak memory grew by {grown_kib} KiB"


class Killed(Exception):
    """The job dies mid-fit."""


def test_an_interrupted_fit_goes_on_from_the_iterate_it_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fit killed after some steps has kept its last iterate; the next attempt starts from it,
    takes fewer iterations and reaches the same certified optimum, and the kept file goes once
    the fit is saved. A kept iterate that was tampered with is refused: the fit starts over."""
    from probe_sweep.probes.kinds import ProbeTask, probe_kind
    from probe_sweep.probes.linear import ProbeConfig, RegConfig
    from tests.memory_rows import in_memory
    from tests.probes.test_solver import ill_conditioned

    x, y = ill_conditioned()
    task, kind = ProbeTask(in_memory(x, y), torch.zeros(60, 1)), probe_kind("softmax")
    reg, cfg, shape = RegConfig(), ProbeConfig(), (60, 24)
    kept = tmp_path / ".fits" / "unfinished" / "layer_0.safetensors"

    def attempt(kill_after: int | None = None) -> FitResult:
        def fit(unfinished: saved_fits.Unfinished) -> FitResult:
            steps: list[LinearProbe] = []

            def keep(probe: LinearProbe) -> None:
                unfinished.keep(probe)
                steps.append(probe)
                if len(steps) == kill_after:
                    raise Killed

            return kind.fit(task, reg, cfg, unfinished.warm_start(None), "layer_0", keep)

        checkpoint = saved_fits.FitCheckpoint(tmp_path, "key", CPU, keep_every_s=0)
        return checkpoint.get_or_fit("layer_0", fit, shape=shape)

    cold = kind.fit(task, reg, cfg, None, "cold", None).convergence
    with pytest.raises(Killed):
        attempt(kill_after=cold["iterations"] - 3)
    assert kept.is_file()
    resumed = attempt().convergence
    assert resumed["init"] == "warm" and resumed["certified"]
    assert resumed["iterations"] < cold["iterations"] - 2, (resumed, cold)
    assert resumed["objective"] == pytest.approx(cold["objective"], rel=2 * cfg.tol)
    assert not kept.exists()

    (tmp_path / ".fits" / "layer_0.safetensors").unlink()
    with pytest.raises(Killed):
        attempt(kill_after=2)
    data = bytearray(kept.read_bytes())
    data[-1] ^= 0xFF
    kept.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger="probe_sweep.fitting.saved_fits")
    assert attempt().convergence["init"] == "zero"
    assert "Refused the kept iterate" in caplog.text
