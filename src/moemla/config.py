"""ModelConfig: the one object all model code receives, its size presets and variant presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

AttentionKind = Literal["mha", "mla"]
PositionKind = Literal["learned", "rope"]
FFNKind = Literal["dense", "moe"]
BalanceRule = Literal["paper", "sign"]
RopeMode = Literal["post", "decoupled"]
RoutingKind = Literal["top-k", "top-p"]
NormKind = Literal["layernorm", "rmsnorm"]
ActivationKind = Literal["gelu", "swiglu"]
LatentKind = Literal["separate", "joint"]
ScoringKind = Literal["softmax", "sigmoid"]
# weights an inference engine holds: fp32, int8 (the CPU and ONNX engines), int4 blocks (the ONNX engine only)
QuantizeKind = Literal["none", "int8", "int4"]
NORM_EPS = 1e-6  # RMSNorm's epsilon (the block's and the joint latent's), DeepSeek-V3's and Llama's
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, the paper block's
GGUFType = Literal["f32", "f16", "q8_0", "q4_0"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_0")  # llama.cpp's weight types, as the GGUF export writes


# the one place for these defaults: what `moemla train` and the demo build (tiny trains on a CPU in minutes),
# and what `moemla info`, `moemla bench` and the API describe (the paper's smallest size, Table 1)
# what `moemla train` builds when neither --preset nor --variant nor a config file says (CPU-sized), and the
# size the paper's tables default to
DEFAULT_PRESET, DEFAULT_VARIANT, PAPER_PRESET = "tiny", "moe-mla-rope", "xs"
DEFAULT_FLAVOR = "paper"  # the paper's block (FLAVORS, below)


def doc(default: object, help: str) -> object:
    """A dataclass field with the help text its derived `--flag` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    # size (Table 1)
    vocab_size: int = 50257  # GPT-2 BPE, as every preset of the paper
    max_seq_len: int = 512
    n_layers: int = 6
    dim: int = 256  # hidden size d
    n_heads: int = 8
    dropout: float = 0.1  # §3.3: on attention and FFN
    bias: bool = True  # GPT-2 style biases on attention and dense-MLP projections

    # the three independent variant choices
    attention: AttentionKind = "mla"
    positions: PositionKind = "rope"
    ffn: FFNKind = "moe"

    # the block's choices (the paper's by default; FLAVORS["deepseek"] sets DeepSeek-V3's, whose runtimes need it)
    norm: NormKind = "layernorm"  # layernorm: Eq. 11-12 (weight and bias); rmsnorm: a weight, no mean, no bias
    # gelu: w2 GELU(w1 x); swiglu: w2 (SiLU(gate x) * up x), for the dense MLP, shared and routed experts alike
    ffn_activation: ActivationKind = "gelu"
    # MLA: separate latents C^K, C^V (Eq. 7-8) or one joint latent C^KV, RMS-normalised, feeding both
    # up-projections (DeepSeek-V2 §2.1.2): the cache then holds r (+ the RoPE key) per token, not 2r
    latent: LatentKind = "separate"

    # mla (§3.1, Eq. 13-14)
    kv_compression: float = 0.5  # rho = r / d; the latent rank r is `kv_lora_rank`
    # post: RoPE after the up-projection (the paper, §3.1); decoupled: DeepSeek-V2's extra RoPE
    # channels per query head and one shared RoPE key cached beside the latents (absorbable decode)
    rope_mode: RopeMode = "post"
    qk_rope_head_dim: int | None = None  # decoupled RoPE channels; None means head_dim / 2

    # rope (§2.3)
    rope_base: float = 10000.0

    # dense feed-forward
    ffn_mult: int = 4  # dense hidden width d_ff = ffn_mult * d
    ffn_inter_dim: int | None = None  # dense hidden width; None means ffn_mult * d (matching searches it)

    # moe (§3.1): 2 shared + 62 routed experts, top-6, each expert 1/4 of the dense FFN
    n_routed_experts: int = 62
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    moe_inter_dim: int | None = None  # expert hidden width; None means d_ff / 4
    bias_in_gate: bool = True  # paper: gates come from softmax(l + b); False: DeepSeek-V3
    # the router's score per expert: softmax over the experts (the paper) or an independent sigmoid (DeepSeek-V3);
    # either way the gates are the chosen experts' scores normalised over the chosen
    scoring: ScoringKind = "softmax"
    # top-k: every token gets n_activated_experts (the paper). top-p (its §7 question 3, dynamic expert selection):
    # each token gets the fewest of its top n_activated_experts, in gate order, whose share of their gate mass
    # reaches routing_p, and at least min_activated_experts
    routing: RoutingKind = "top-k"
    routing_p: float = 0.5
    min_activated_experts: int = 1
    balance_rule: BalanceRule = "paper"  # paper: Algorithm 1; sign: torchtitan / Megatron-LM
    balance_rate: float = 1e-3  # gamma of Algorithm 1

    def __post_init__(self) -> None:
        validate(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_lora_rank(self) -> int:
        return max(1, round(self.kv_compression * self.dim))

    @property
    def rope_dim(self) -> int:
        """Channels RoPE rotates per head: all of head_dim (post) or the decoupled part."""
        if self.rope_mode == "decoupled":
            return self.qk_rope_head_dim or self.head_dim // 2
        return self.head_dim

    @property
    def decoupled(self) -> bool:
        return self.attention == "mla" and self.positions == "rope" and self.rope_mode == "decoupled"

    @property
    def dense_inter_dim(self) -> int:
        """The dense MLP's hidden width: ffn_mult * d for GELU; for SwiGLU's three matrices 2/3 of it, so both hold
        the same parameters (to a multiple of 8: grouped matmuls, ours and transformers', want 16-byte rows)."""
        if self.ffn_inter_dim:
            return self.ffn_inter_dim
        return _swiglu_width(self.ffn_mult * self.dim, self.ffn_activation)

    @property
    def expert_inter_dim(self) -> int:
        """Each expert 1/4 of the dense FFN (§3.1) in parameters: d_ff / 4 for GELU, 2/3 of that for SwiGLU."""
        if self.moe_inter_dim:
            return self.moe_inter_dim
        if self.ffn_activation == "gelu":
            return self.dense_inter_dim // 4
        return _swiglu_width(self.ffn_mult * self.dim // 4, self.ffn_activation)

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {field_names()}")
        return cls(**data)

    @classmethod
    def from_preset(
        cls, size: str = PAPER_PRESET, variant: str = DEFAULT_VARIANT, flavor: str = DEFAULT_FLAVOR, **overrides: object
    ) -> ModelConfig:
        if size not in SIZES:
            raise ConfigError(f"unknown size preset {size!r}; choose one of {list(SIZES)}")
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
        if flavor not in FLAVORS:
            raise ConfigError(f"unknown flavor {flavor!r}; choose one of {list(FLAVORS)}")
        return cls.from_dict({**SIZES[size], **VARIANTS[variant], **FLAVORS[flavor], **overrides})


def _swiglu_width(gelu_width: int, activation: str) -> int:
    """The hidden width with a GELU MLP's parameters: itself, or 2/3 of it for SwiGLU to the nearest multiple of 8."""
    return gelu_width if activation == "gelu" else max(8, round(2 * gelu_width / 3 / 8) * 8)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


# Table 1 (vocab 50,257, max sequence 512) plus two sizes for CPU work and tests.
SIZES: dict[str, dict[str, object]] = {
    "debug": dict(
        n_layers=2, dim=32, n_heads=4, vocab_size=256, max_seq_len=64,
        n_routed_experts=14, n_shared_experts=2, n_activated_experts=4,
    ),
    "tiny": dict(n_layers=4, dim=128, n_heads=4, vocab_size=4096, max_seq_len=256),
    "xs": dict(n_layers=6, dim=256, n_heads=8, vocab_size=50257, max_seq_len=512),
    "s": dict(n_layers=6, dim=512, n_heads=8, vocab_size=50257, max_seq_len=512),
    "m": dict(n_layers=9, dim=512, n_heads=8, vocab_size=50257, max_seq_len=512),
    "l": dict(n_layers=12, dim=768, n_heads=12, vocab_size=50257, max_seq_len=512),
    "xl": dict(n_layers=12, dim=1024, n_heads=16, vocab_size=50257, max_seq_len=512),
}  # fmt: skip

# Table 2's rows, the RoPE baselines the paper leaves out (mha-rope, moe-mha-rope), and decoupled RoPE.
VARIANTS: dict[str, dict[str, str]] = {
    "mha": dict(attention="mha", positions="learned", ffn="dense"),
    "mla": dict(attention="mla", positions="learned", ffn="dense"),
    "mla-rope": dict(attention="mla", positions="rope", ffn="dense"),
    "moe-mha": dict(attention="mha", positions="learned", ffn="moe"),
    "moe-mla": dict(attention="mla", positions="learned", ffn="moe"),
    "moe-mla-rope": dict(attention="mla", positions="rope", ffn="moe"),
    "mha-rope": dict(attention="mha", positions="rope", ffn="dense"),
    "moe-mha-rope": dict(attention="mha", positions="rope", ffn="moe"),
    "mla-drope": dict(attention="mla", positions="rope", ffn="dense", rope_mode="decoupled"),
    "moe-mla-drope": dict(attention="mla", positions="rope", ffn="moe", rope_mode="decoupled"),
}


# The block's choices as named sets (STYLE: choices, not names; a flavor only sets them). paper: LayerNorm, GELU,
# separate latents, softmax routing with the bias in the gate (the paper's §3.1 and Algorithm 1). deepseek: the
# block of DeepSeek-V3 (RMSNorm without biases, SwiGLU experts, one RMS-normalised joint latent, sigmoid scores with
# the balancing bias used for selection only), which llama.cpp, vLLM, SGLang and transformers run natively: with
# --variant moe-mla-drope or mla-drope it is DeepSeek-V3's architecture, with mha-rope Llama's.
FLAVORS: dict[str, dict[str, object]] = {
    "paper": {},
    "deepseek": dict(norm="rmsnorm", ffn_activation="swiglu", latent="joint", scoring="sigmoid", bias=False,
                     bias_in_gate=False),
}  # fmt: skip
BLOCK_FIELDS = ("norm", "ffn_activation", "latent", "scoring", "bias", "bias_in_gate")


def flavor_name(cfg: ModelConfig) -> str | None:
    """The flavor whose block choices equal cfg's (None: a mix of them)."""
    defaults = ModelConfig.__dataclass_fields__
    for name, choices in FLAVORS.items():
        if all(getattr(cfg, f) == choices.get(f, defaults[f].default) for f in BLOCK_FIELDS):
            return name
    return None


def variant_name(cfg: ModelConfig) -> str | None:
    """The preset name whose three choices equal cfg's, if any (for display only)."""
    choice = dict(attention=cfg.attention, positions=cfg.positions, ffn=cfg.ffn, rope_mode=cfg.rope_mode)
    return next((name for name, v in VARIANTS.items() if {"rope_mode": "post", **v} == choice), None)


def _check_choice(cfg: ModelConfig, name: str, kind: object) -> None:
    allowed = get_args(kind)
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")


def validate(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field that cannot work, and what would."""
    _check_choice(cfg, "attention", AttentionKind)
    _check_choice(cfg, "positions", PositionKind)
    _check_choice(cfg, "ffn", FFNKind)
    _check_choice(cfg, "balance_rule", BalanceRule)
    _check_choice(cfg, "rope_mode", RopeMode)
    _check_choice(cfg, "routing", RoutingKind)
    _check_choice(cfg, "norm", NormKind)
    _check_choice(cfg, "ffn_activation", ActivationKind)
    _check_choice(cfg, "latent", LatentKind)
    _check_choice(cfg, "scoring", ScoringKind)
    if cfg.rope_mode == "decoupled" and not (cfg.attention == "mla" and cfg.positions == "rope"):
        raise ConfigError("rope_mode='decoupled' needs attention='mla' and positions='rope'")
    if cfg.decoupled and (cfg.rope_dim < 2 or cfg.rope_dim % 2):
        raise ConfigError(f"qk_rope_head_dim must be a positive even number, got {cfg.rope_dim}")
    for name in ("vocab_size", "max_seq_len", "n_layers", "dim", "n_heads", "ffn_mult"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    if cfg.dim % cfg.n_heads:
        raise ConfigError(
            f"dim={cfg.dim} is not divisible by n_heads={cfg.n_heads}; pick a dim that is a multiple of {cfg.n_heads}"
        )
    if cfg.positions == "rope" and cfg.head_dim % 2:
        raise ConfigError(f"RoPE rotates pairs of channels: head_dim={cfg.head_dim} must be even")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 < cfg.kv_compression <= 1.0:
        raise ConfigError(
            f"kv_compression (rho = r/d) must be in (0, 1], got {cfg.kv_compression}; Table 4 uses 1, 0.5, 0.25, 0.125"
        )
    if cfg.rope_base <= 1.0:
        raise ConfigError(f"rope_base must be > 1, got {cfg.rope_base}")
    if cfg.n_routed_experts < 1 or cfg.n_shared_experts < 0:
        raise ConfigError("n_routed_experts must be >= 1 and n_shared_experts >= 0")
    if not 1 <= cfg.n_activated_experts <= cfg.n_routed_experts:
        raise ConfigError(
            f"n_activated_experts (top-k) = {cfg.n_activated_experts} must be between 1 and "
            f"n_routed_experts = {cfg.n_routed_experts}"
        )
    if not 0.0 < cfg.routing_p <= 1.0:
        raise ConfigError(f"routing_p (the gate mass top-p routing keeps) must be in (0, 1], got {cfg.routing_p}")
    if not 1 <= cfg.min_activated_experts <= cfg.n_activated_experts:
        raise ConfigError(
            f"min_activated_experts = {cfg.min_activated_experts} must be between 1 and n_activated_experts = "
            f"{cfg.n_activated_experts} (top-p routing's largest set)"
        )
    if cfg.ffn_inter_dim is not None and cfg.ffn_inter_dim < 1:
        raise ConfigError(f"ffn_inter_dim must be a positive integer or None, got {cfg.ffn_inter_dim}")
    if cfg.moe_inter_dim is not None and cfg.moe_inter_dim < 1:
        raise ConfigError(f"moe_inter_dim must be a positive integer or None, got {cfg.moe_inter_dim}")
    if cfg.ffn == "moe" and cfg.expert_inter_dim < 1:
        raise ConfigError("expert hidden width is 0: raise ffn_mult or set moe_inter_dim")
    if cfg.balance_rate < 0:
        raise ConfigError(f"balance_rate (gamma) must be >= 0, got {cfg.balance_rate}")


# ModelConfig fields that the model's second implementations (the CPU engine, the Hugging Face export's remote
# code) implement, each with the values they support (None: any value). A field not listed (a new one) must keep
# its default there, or they refuse the model rather than silently ignore the field.
PORTABLE: dict[str, tuple[object, ...] | None] = {
    "vocab_size": None, "max_seq_len": None, "n_layers": None, "dim": None, "n_heads": None, "bias": None,
    "attention": ("mha", "mla"), "positions": ("learned", "rope"), "ffn": ("dense", "moe"),
    "kv_compression": None, "rope_mode": ("post", "decoupled"), "qk_rope_head_dim": None, "rope_base": None,
    "ffn_mult": None, "ffn_inter_dim": None, "n_routed_experts": None, "n_shared_experts": None,
    "n_activated_experts": None, "moe_inter_dim": None, "bias_in_gate": None,
    "dropout": None, "balance_rule": None, "balance_rate": None,  # training only
}  # fmt: skip


# The ONNX graph is built from the model's own functions (inference/onnx/graph.py calls model/), so it runs every
# block choice; only top-p routing's data-dependent expert count stays out of its static shapes. The CPU engine
# (inference/cpu) implements the same block choices (RMSNorm, SwiGLU, the joint latent, sigmoid scoring) in its
# own numpy and numba code, held to the model by tests; the remote code keeps to PORTABLE.
ONNX_PORTABLE: dict[str, tuple[object, ...] | None] = {
    **PORTABLE,
    "norm": None,
    "ffn_activation": None,
    "latent": None,
    "scoring": None,
}
CPU_PORTABLE = ONNX_PORTABLE


def portable(cfg: ModelConfig, table: dict[str, tuple[object, ...] | None] = PORTABLE) -> bool:
    """Whether a second implementation (whose fields are `table`) runs this model (check_portable would pass)."""
    try:
        check_portable(cfg, "", "", table)
    except ConfigError:
        return False
    return True


def check_portable(
    cfg: ModelConfig, what: str, way_out: str, table: dict[str, tuple[object, ...] | None] = PORTABLE
) -> None:
    """ConfigError naming the first config field that `what` (a second implementation, whose fields are `table`)
    does not implement."""
    defaults = type(cfg)()
    for f in dataclasses.fields(cfg):
        value, allowed = getattr(cfg, f.name), table.get(f.name, ())
        if f.name not in table and value != getattr(defaults, f.name):
            raise ConfigError(f"{what} does not implement ModelConfig.{f.name}={value!r}; {way_out}")
        if allowed and value not in allowed:
            raise ConfigError(f"{what} supports {f.name} in {allowed}, not {value!r}; {way_out}")
