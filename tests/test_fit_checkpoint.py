"""Saved probes for resuming a job (saved_fits.FitCheckpoint): safetensors + JSON, never pickle."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probe_sweep import saved_fits
from probe_sweep.probes import FitResult, LinearProbe

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
        history=[{"epoch": 1, "train_loss": 2.5, "val_loss": float("nan")}],
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
            assert repr(a) == repr(b), spec.name  # repr: nan == nan


@pytest.mark.parametrize("map_weight", [True, False])
def test_a_fit_round_trips_through_safetensors(tmp_path: Path, map_weight: bool) -> None:
    fit = a_fit(map_weight)
    first = saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda: fit)
    assert first is fit
    saved = tmp_path / ".fits" / "layer_0.safetensors"
    with safe_open(str(saved), "pt") as f:
        assert "probe.weight" in f.keys() and f.metadata()["type"].endswith("FitResult")

    def must_not_fit() -> FitResult:
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
    caplog.set_level(logging.WARNING, logger="probe_sweep.saved_fits")
    fit = a_fit()
    got = saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda: fit)
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
    saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", a_fit)
    path = tmp_path / ".fits" / "layer_0.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "probe.bias"}
    save_file(tensors, str(path), metadata=metadata)
    caplog.set_level(logging.WARNING, logger="probe_sweep.saved_fits")
    again = a_fit(map_weight=False)
    got = saved_fits.FitCheckpoint(tmp_path, "key", CPU).get_or_fit("layer_0", lambda: again)
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
    with pytest.raises(ValueError, match="not probe_sweep.probes.FitResult"):
        saved_fits.load_fit(path, FitResult)
