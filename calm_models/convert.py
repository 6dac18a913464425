"""Import the authors' released CALM checkpoints (Hugging Face format) as runs of this project.

Command line (:doc:`/released` explains it)::

    python -m calm_models.convert REFERENCE_DIR OUT_RUN [--autoencoder AE_DIR]
        [--tokenizer FILE] [--eos-token TOKEN] [--block-len 2048] [--overwrite]

``REFERENCE_DIR`` holds an ``EnergyTransformer`` (CALM, normally with its frozen autoencoder
``ae_model.*``) or an ``Autoencoder``. Every tensor is copied as is; an unknown, missing or
misshapen key, or a config value this project does not implement, is refused with one line.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from calm_models import checkpoint as ckpt
from calm_models.config import (
    AutoencoderConfig,
    BackboneConfig,
    CALMConfig,
    DataConfig,
    HeadConfig,
    TrainConfig,
    save_config,
)
from calm_models.data import DataError, TextTokenizer
from calm_models.errors import CalmError
from calm_models.runs import build_model

_MLP = {"mlp.gate_proj": "ffn.w1", "mlp.up_proj": "ffn.w3", "mlp.down_proj": "ffn.w2"}
_SWIGLU = {**_MLP, "layernorm": "norm"}
_BACKBONE = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn": "attn", **_MLP}
_CALM_NAMES = {"transformer.embed_tokens.weight": "embedding.weight", "transformer.norm.weight": "backbone.norm.weight"}
_PROJECTIONS = dict(
    squeeze_layer="squeeze", hidden_to_latent="to_latent", latent_to_hidden="from_latent", expand_layer="expand"
)


class ConversionError(CalmError, ValueError):
    """A reference checkpoint that cannot be converted exactly (a one-line message)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: cannot read it ({exc})") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint folder (single file or index + shards)."""
    from safetensors.torch import load_file

    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            files = sorted(set(_read_json(folder / name)["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    if not files:
        raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            if name.endswith(".safetensors"):
                state.update(load_file(str(folder / name)))
            else:
                state.update(torch.load(folder / name, map_location="cpu", weights_only=True))
        except Exception as exc:  # a truncated or foreign file
            raise ConversionError(f"{folder / name}: cannot read it ({type(exc).__name__})") from None
    return state


def _require(cfg: dict, where: Path, **expected: object) -> None:
    for key, value in expected.items():
        if cfg.get(key, value) != value:
            raise ConversionError(f"{where}: {key}={cfg[key]!r} is not supported (only {value!r})")


def _ae_config(cfg: dict, where: Path) -> AutoencoderConfig:
    _require(cfg, where, hidden_act="silu", mlp_bias=False)
    enc, dec = cfg.get("num_encoder_layers", 2), cfg.get("num_decoder_layers", 2)
    if enc // 2 != dec // 2:
        raise ConversionError(f"{where}: num_encoder_layers={enc} and num_decoder_layers={dec} differ")
    same = {k: cfg[k] for k in ("vocab_size", "latent_size", "hidden_size", "intermediate_size")}
    dropout, eps = cfg.get("ae_dropout", 0.15), cfg.get("rms_norm_eps", 1e-6)
    return AutoencoderConfig(
        **same,
        chunk_size=cfg["patch_size"],
        num_token_layers=enc // 2,
        num_chunk_layers=enc // 2,
        kl_weight=cfg.get("kl_weight", 1e-3),
        kl_clamp=cfg.get("kl_clamp", 0.5),
        mask_prob=dropout,
        latent_dropout=dropout,
        norm_eps=eps,
        inner_norms=False,
        projection_bias=True,
    )


def _ae_keys(
    state: dict[str, torch.Tensor], cfg: AutoencoderConfig, prefix: str, out_prefix: str
) -> dict[str, torch.Tensor]:
    """Our autoencoder's tensors from the reference's (``prefix``: ``""`` or ``"ae_model."``)."""
    s = cfg.num_token_layers
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        m = re.fullmatch(r"(encoder|decoder)\.(?:en|de)coder_layers\.(\d+)\.(.+)", name)
        if m:
            side, i, rest = m[1], int(m[2]), m[3]
            if i >= 2 * s:  # the reference never uses the extra layer of an odd count
                continue
            stacks = ("token_layers", "chunk_layers") if side == "encoder" else ("chunk_layers", "token_layers")
            for old, new in _SWIGLU.items():
                rest = rest.replace(old, new) if rest.startswith(old) else rest
            name = f"{side}.{stacks[i >= s]}.{i % s}.{rest}"  # layer i < 2 s: the first stack, then the second
        elif name == "decoder.lm_head_weight":
            if not torch.equal(value, state[prefix + "encoder.embed_tokens.weight"]):
                raise ConversionError(
                    "decoder.lm_head_weight differs from the token embedding: "
                    "the autoencoder's tied output layer is not tied in the file"
                )
            continue
        else:
            name = {"encoder.embed_tokens.weight": "embedding.weight"}.get(name, name)
            for old, new in _PROJECTIONS.items():
                name = name.replace(old, new)
        out[out_prefix + name] = value
    return out


def _calm_config(cfg: dict, ae: AutoencoderConfig, where: Path) -> CALMConfig:
    _require(cfg, where, hidden_act="silu", mlp_bias=False, attention_bias=False, rope_scaling=None)
    _require(cfg, where, patch_size=ae.chunk_size, latent_size=ae.latent_size, vocab_size=ae.vocab_size)
    h = cfg["hidden_size"]
    backbone = BackboneConfig(
        hidden_size=h,
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn_size=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
    )
    head = HeadConfig(
        type="energy_mlp",
        hidden_size=h,
        num_blocks=cfg.get("num_mlp_layers", 4),
        noise_size=cfg.get("noise_size", 64),
        num_samples=cfg.get("num_samples", 8),
        beta=float(cfg.get("beta", 1.0)),
    )
    return CALMConfig(backbone=backbone, head=head, num_targets=100, compress="mlp")


def _calm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith(("ae_model.", "generative_head.")) or key.endswith("rotary_emb.inv_freq"):
            continue  # the autoencoder is mapped separately; generative_head is an alias
        if key.startswith("transformer.layers."):
            name = "backbone.layers." + key[len("transformer.layers.") :]
            for old, new in _BACKBONE.items():
                name = name.replace(f".{old}.", f".{new}.")
        else:
            name = (
                _CALM_NAMES.get(key, key).replace("embed_proj.", "compress.", 1).replace("mlp_generator.", "head.", 1)
            )
        out[name] = value
    return out


def _load_tokenizer(given: str | None, eos_token: str | None, src: Path, ae_dir: Path | None) -> TextTokenizer:
    """``given``, else the ``tokenizer.json`` beside the model or its autoencoder."""
    beside = [d / "tokenizer.json" for d in (src, ae_dir) if d is not None and (d / "tokenizer.json").is_file()]
    if not (given or beside):
        raise ConversionError(f"no tokenizer.json beside {src}; pass --tokenizer FILE")
    try:
        return TextTokenizer.load(given or beside[0], eos_token=eos_token)
    except DataError as exc:
        raise ConversionError(str(exc)) from None


def convert(
    reference_dir: str | Path,
    out_run: str | Path,
    *,
    autoencoder: str | Path | None = None,
    tokenizer: str | None = None,
    eos_token: str | None = None,
    block_len: int = 2048,
    overwrite: bool = False,
) -> Path:
    """Convert a reference CALM (or autoencoder) directory into a run directory.

    Returns:
        The run directory, holding ``config.yaml``, ``tokenizer.json`` and one checkpoint.

    Raises:
        ConversionError: One line: what could not be read or mapped exactly.
    """
    src, out = Path(reference_dir), Path(out_run)
    ae_dir = Path(autoencoder) if autoencoder else None
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} is not empty; pass --overwrite to replace it")
    cfg = _read_json(src / "config.json")
    kind = (cfg.get("architectures") or ["?"])[0]
    if kind not in ("EnergyTransformer", "Autoencoder"):
        raise ConversionError(
            f"{src}: architectures={kind!r}; only EnergyTransformer (CALM with the "
            "energy head) and Autoencoder checkpoints can be converted"
        )
    state = _read_weights(src)
    ae_state, ae_prefix = state, ""
    if kind == "Autoencoder":
        ae_cfg = _ae_config(cfg, src)
    elif any(k.startswith("ae_model.") for k in state):
        ae_json, ae_prefix = (ae_dir or Path(cfg.get("ae_path") or "-")) / "config.json", "ae_model."
        ae_cfg = _ae_config(_read_json(ae_json) if ae_json.is_file() else _ae_from_weights(state, ae_prefix, cfg), src)
    elif ae_dir is None:
        raise ConversionError(f"{src} holds no autoencoder weights (ae_model.*); pass --autoencoder AE_DIR")
    else:
        ae_cfg, ae_state = _ae_config(_read_json(ae_dir / "config.json"), ae_dir), _read_weights(ae_dir)
    stage = "autoencoder" if kind == "Autoencoder" else "calm"
    weights = _ae_keys(ae_state, ae_cfg, ae_prefix, "" if stage == "autoencoder" else "autoencoder.")
    run_cfg = TrainConfig(
        stage=stage,
        autoencoder=ae_cfg,
        autoencoder_path=str(ae_dir or src) if stage == "calm" else None,
        data=DataConfig(vocab_size=max(257, ae_cfg.vocab_size), block_len=block_len, eos_token=eos_token),
    )
    if stage == "calm":
        run_cfg = replace(run_cfg, calm=_calm_config(cfg, ae_cfg, src))
        weights.update(_calm_keys(state))
    tok = _load_tokenizer(tokenizer, eos_token, src, ae_dir)
    if tok.vocab_size != ae_cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {tok.vocab_size} tokens but the model vocab_size={ae_cfg.vocab_size}")
    model = build_model(run_cfg, ae_cfg.vocab_size)
    _load_exactly(model, weights, src)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_config(run_cfg, out / "config.yaml")
    tok.save(out / "tokenizer.json")
    ckpt.save_checkpoint(out, step=0, model=model, config=run_cfg, train_state={"converted": str(src)})
    return out


def _load_exactly(model: torch.nn.Module, weights: dict[str, torch.Tensor], src: Path) -> None:
    """Load ``weights`` (as fp32) into ``model`` when every key and shape matches, else one-line ConversionError."""
    expected = model.state_dict()
    missing, unknown = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    bad = [k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape]
    if missing or unknown or bad:
        what = f"missing {missing[:4]}" if missing else f"unknown {unknown[:4]}" if unknown else ""
        if not what:
            k = bad[0]
            what = f"shape of {k}: {tuple(weights[k].shape)} in the file, {tuple(expected[k].shape)} expected"
        raise ConversionError(f"{src}: the weights do not map exactly onto the model: {what}")
    model.load_state_dict({k: v.float() for k, v in weights.items()})


def _ae_from_weights(state: dict[str, torch.Tensor], prefix: str, calm: dict) -> dict:
    """An autoencoder ``config.json`` read off its tensors (the CALM file's ``ae_path`` is not at hand)."""

    def count(side: str) -> int:
        pattern = re.compile(rf"{prefix}{side}\.{side}_layers\.(\d+)\.")
        return 1 + max(int(m[1]) for k in state if (m := pattern.match(k)))

    embed = state[prefix + "encoder.embed_tokens.weight"]
    return {
        "vocab_size": embed.shape[0],
        "hidden_size": embed.shape[1],
        "patch_size": calm["patch_size"],
        "latent_size": calm["latent_size"],
        "intermediate_size": state[prefix + "encoder.encoder_layers.0.mlp.gate_proj.weight"].shape[0],
        "num_encoder_layers": count("encoder"),
        "num_decoder_layers": count("decoder"),
        "rms_norm_eps": calm.get("rms_norm_eps", 1e-6),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calm_models.convert``; errors print one line and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m calm_models.convert", description=__doc__.split("\n")[0])
    parser.add_argument("reference_dir")
    parser.add_argument("out_run")
    parser.add_argument("--autoencoder", default=None, help="the autoencoder's folder")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside it)")
    parser.add_argument("--eos-token", default=None, help="EOS token (default: detected)")
    parser.add_argument("--block-len", type=int, default=2048, help="evaluation block length")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = convert(**vars(args))  # the options are convert's keyword arguments
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
