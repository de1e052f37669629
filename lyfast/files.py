"""LyCORIS files: reading and writing state-dict files, and checking and rebuilding adapters from them.

Safetensors or torch.save files (told apart by content), save dtypes, and the per-algorithm key/shape checks
that turn a file into modules over a model's layers, each error naming the key.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .config import MODULE_LIST, SUPPORTED_ALGOS
from .modules.boft import ButterflyOFTModule
from .modules.loha import LohaModule
from .modules.lokr import LokrModule
from .modules.base import holds_exactly
from .targeting import _is_fp8_weight_only_linear, _short

logger = logging.getLogger("lyfast")

# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def is_safetensors_file(file) -> bool:
    """Whether `file` holds safetensors data: an 8-byte little-endian header length, then a JSON object
    (decided from the content, not the suffix, so "model.SAFETENSORS" or a renamed file is read right)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
        if not 2 <= size <= os.fstat(f.fileno()).st_size - 8:
            return False
        header = f.read(size)
    return header.startswith(b"{") and header.rstrip().endswith(b"}")


def load_state_dict_file(file) -> Dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch.save file, told apart by content. torch files are read
    with weights_only=True: a file that needs arbitrary unpickling is refused, never unpickled."""
    if is_safetensors_file(file):
        from safetensors.torch import load_file

        try:
            return load_file(file)
        except Exception as exc:  # safetensors' own message ("incomplete metadata", ...) names no file
            raise ValueError(f"{file}: a damaged or truncated safetensors file ({exc})") from None
    with open(file, "rb") as f:  # a file object: torch.load would go by a ".safetensors" suffix itself
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's message would suggest weights_only=False, i.e. running the file's code
            raise ValueError(f"{file}: neither a safetensors file nor a torch.save file of plain tensors "
                             f"({type(exc).__name__}); lyfast does not unpickle arbitrary objects") from None


_DTYPE_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def save_dtype(dtype):
    """The floating dtype to save in: None, a floating torch.dtype, or its name ("float16", "bf16", ...);
    anything else (an integer or bool dtype would silently destroy the weights) is a ValueError/TypeError."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not a floating-point dtype name ({', '.join(_DTYPE_NAMES)})")
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, a dtype name or None, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype to save adapter weights, got {dtype}")
    return dtype


def save_state_dict_file(state_dict, file, dtype=None, metadata=None):
    """Write `state_dict` (cast to `dtype`) as safetensors when the suffix is .safetensors (any case), else
    with torch.save. Written to a temporary file in the same folder, then renamed over `file`, so a
    failure part-way (a full disk) leaves any old file intact."""
    if metadata is not None and len(metadata) == 0:
        metadata = None
    dtype = save_dtype(dtype)
    state_dict = {k: _detached(v, _alpha_dtype(v, dtype) if _is_alpha(k) else dtype, k) for k, v in state_dict.items()}
    file = os.fspath(file)
    folder = os.path.dirname(os.path.abspath(file))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(file)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if file.lower().endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state_dict, tmp, metadata or {})
        else:
            torch.save(state_dict, tmp)
        os.chmod(tmp, _file_mode(file))  # mkstemp makes it 0600; keep what a plain open() would give
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return state_dict


def _file_mode(file) -> int:
    if os.path.exists(file):
        return os.stat(file).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _alpha_dtype(alpha, dtype):
    """The dtype an `alpha` is saved in: `dtype` when it holds the value exactly, else float32 (for alpha a
    hyper-parameter, not a weight: fp16 turns the 100000 that full-matrix LoKr recipes store into inf, bf16 an
    alpha of 0.3 into 0.30078, a different scale after reloading). Every loader (LyCORIS, ComfyUI, sd-scripts,
    lyfast) reads alpha as a number, so a float32 alpha in an fp16/bf16 file loads everywhere."""
    if dtype is None or holds_exactly(alpha.detach().cpu(), dtype):
        return dtype
    return torch.promote_types(alpha.dtype, torch.float32)


def _is_alpha(key) -> bool:
    return key.rsplit(".", 1)[-1] == "alpha"


def _detached(tensor, dtype, key="tensor"):
    """`tensor` detached and, with `dtype`, cast on the CPU; a finite value that the dtype cannot hold (an
    overflow to inf) is a ValueError naming the key, never a file that no loader accepts."""
    tensor = tensor.detach()
    if dtype is not None:
        cast = tensor.clone().to("cpu").to(dtype)
        if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
            finite = torch.isfinite(tensor.to("cpu"))
            if bool((finite & ~torch.isfinite(cast)).any()):
                peak = tensor.detach().abs()[finite].max().item()
                raise ValueError(
                    f"{key}: values up to {peak:.6g} overflow {dtype} (max {torch.finfo(dtype).max:.6g}); save in "
                    "bf16 or fp32 instead")
        tensor = cast
    return tensor


# ---------------------------------------------------------------------------------------------------------
# Building adapters from a state dict (create_lycoris_from_weights, kohya create_network_from_weights)
# ---------------------------------------------------------------------------------------------------------
# Keys of LyCORIS algorithms lyfast does not implement -> the algorithm to name in the error.
_FOREIGN_KEYS = {
    "lora_up.weight": "lora/locon", "lora_down.weight": "lora/locon", "lora_mid.weight": "lora/locon (tucker)",
    "diff": "full", "diff_b": "full", "on_input": "ia3", "w_norm": "norm (train_norm)",
    "b_norm": "norm (train_norm)", "a1.weight": "glora", "a2.weight": "glora", "b1.weight": "glora",
    "b2.weight": "glora", "bm.weight": "glora", "lambda_layer": "tlora", "q_layer.weight": "tlora",
    "p_layer.weight": "tlora",
}


def checked_weights(weights_sd) -> Dict[str, torch.Tensor]:
    """A file's {key: tensor} made safe to load, naming the key on any problem: a Python number becomes a
    0-d tensor and an `alpha` of shape (1,) (written by some tools) a 0-d one; a value that is not a
    tensor is a TypeError, an alpha with several values or a NaN/Inf anywhere a ValueError."""
    if not isinstance(weights_sd, dict):
        raise TypeError(f"weights must be a dict of tensors, got {type(weights_sd).__name__}")
    out = {}
    for key, value in weights_sd.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
        if key.rsplit(".", 1)[-1] == "alpha":
            if value.numel() != 1:
                raise ValueError(f"{key}: alpha must hold one number, got shape {tuple(value.shape)}")
            value = value.reshape(())
        if _unused_inf_alpha(key, value, weights_sd):
            pass  # an fp16 file that older lyfast or LyCORIS wrote for full-matrix LoKr: alpha is unused there
        elif (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = "NaN" if bool(torch.isnan(value).any()) else "Inf"
            raise ValueError(f"{key} {tuple(value.shape)} contains {bad} values: the file is damaged")
        out[key] = value
    return out


def _unused_inf_alpha(key, value, weights_sd) -> bool:
    """An alpha of +inf where both LoKr factors are full matrices: the scale is 1 whatever alpha says (LyCORIS
    loads such files; fp16 saves of `lora_dim=100000` recipes wrote them before alpha was kept in float32)."""
    if not _is_alpha(key) or value.numel() != 1 or not bool(torch.isposinf(value.reshape(()))):
        return False
    prefix = key[: -len("alpha")]
    return f"{prefix}lokr_w1" in weights_sd and f"{prefix}lokr_w2" in weights_sd


def group_keys(weights_sd) -> Tuple[Dict[str, Dict[str, torch.Tensor]], List[str]]:
    """{lora_name: {param: tensor}} from `lora_name.param` keys, and the keys without a dot."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    loose = []
    for key, value in weights_sd.items():
        if "." not in key:
            loose.append(key)
            continue
        lora_name, param = key.split(".", 1)
        groups.setdefault(lora_name, {})[param] = value
    return groups, loose


def detect_algo(lora_name, params: Dict[str, torch.Tensor]):
    """The lyfast class for one adapter's keys; a clear error for anything else."""
    if "oft_blocks" in params and params["oft_blocks"].ndim == 3:
        raise ValueError(f"{lora_name}.oft_blocks is 3-D: a diag-oft (OFT) adapter, which lyfast does not "
                         f"implement (supported: {', '.join(SUPPORTED_ALGOS)})")
    for param in params:
        if param in _FOREIGN_KEYS:
            raise ValueError(f"{lora_name}.{param} belongs to the {_FOREIGN_KEYS[param]} algorithm, which lyfast "
                             f"does not implement (supported: {', '.join(SUPPORTED_ALGOS)})")
    found = [cls for cls in MODULE_LIST if cls.algo_check({f"{lora_name}.{k}": v for k, v in params.items()},
                                                           lora_name)]
    if not found:
        raise ValueError(f"cannot tell the algorithm of {lora_name} from its keys "
                         f"{sorted(lora_name + '.' + k for k in params)}")
    return found[0]


def _weight_shape(module) -> Tuple[int, ...]:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if isinstance(module, nn.Linear) or _is_fp8_weight_only_linear(module):
        return (module.out_features, module.in_features)
    raise ValueError(f"unsupported layer type {type(module).__name__}")


def _shape_error(lora_name, shape, detail):
    return ValueError(f"{lora_name}: {detail} (the layer's weight is {tuple(shape)})")


def _key(lora_name, param, t):
    return f"{lora_name}.{param} {tuple(t.shape)}"


def _check_loha(lora_name, p, shape):
    out, fan_in = shape[0], math.prod(shape[1:])
    if ("hada_t1" in p) != ("hada_t2" in p):
        which = "hada_t2" if "hada_t1" in p else "hada_t1"
        raise ValueError(f"{lora_name}.{which} is missing (a Tucker LoHa needs both hada_t1 and hada_t2)")
    ranks = []
    for i in (1, 2):
        a, b, t = p.get(f"hada_w{i}_a"), p.get(f"hada_w{i}_b"), p.get(f"hada_t{i}")
        for name, x in ((f"hada_w{i}_a", a), (f"hada_w{i}_b", b)):
            if x is None:
                raise ValueError(f"{lora_name}.{name} is missing (LoHa needs hada_w1_a/b and hada_w2_a/b)")
        if t is None:
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != out or b.shape != (a.shape[1], fan_in):
                raise _shape_error(lora_name, shape, f"{_key(lora_name, f'hada_w{i}_a', a)} and "
                                   f"{_key(lora_name, f'hada_w{i}_b', b)} do not give a ({out}, {fan_in}) product")
            ranks.append(a.shape[1])
        else:
            ok = (len(shape) > 2 and a.ndim == 2 and b.ndim == 2 and t.ndim == len(shape)
                  and a.shape[1] == out and b.shape[1] == shape[1] and t.shape[0] == a.shape[0]
                  and t.shape[1] == b.shape[0] and tuple(t.shape[2:]) == tuple(shape[2:]))
            if not ok:
                raise _shape_error(lora_name, shape, f"Tucker factors {_key(lora_name, f'hada_t{i}', t)}, "
                                   f"{_key(lora_name, f'hada_w{i}_a', a)}, {_key(lora_name, f'hada_w{i}_b', b)} "
                                   f"do not rebuild the weight")
            ranks.append(a.shape[0])
    if ranks[0] != ranks[1]:
        raise ValueError(f"{lora_name}: hada_w1 rank {ranks[0]} differs from hada_w2 rank {ranks[1]}")


def _check_lokr(lora_name, p, shape):
    if "lokr_t1" in p:
        raise ValueError(f"{lora_name}.lokr_t1: LyCORIS never uses a Tucker w1 and neither does lyfast")
    if "lokr_w1" in p:
        w1 = tuple(p["lokr_w1"].shape)
        if "lokr_w1_a" in p or "lokr_w1_b" in p:
            raise ValueError(f"{lora_name}: both lokr_w1 and lokr_w1_a/lokr_w1_b are present")
    else:
        a, b = p.get("lokr_w1_a"), p.get("lokr_w1_b")
        if b is None:
            raise ValueError(f"{lora_name}.lokr_w1_b is missing (lokr_w1_a needs it)")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"{lora_name}: {_key(lora_name, 'lokr_w1_a', a)} and "
                             f"{_key(lora_name, 'lokr_w1_b', b)} cannot be multiplied")
        w1 = (a.shape[0], b.shape[1])
    if "lokr_w2" in p:
        w2 = tuple(p["lokr_w2"].shape)
        if any(k in p for k in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
            raise ValueError(f"{lora_name}: both lokr_w2 and lokr_w2_a/lokr_w2_b are present")
    else:
        a, b, t = p.get("lokr_w2_a"), p.get("lokr_w2_b"), p.get("lokr_t2")
        for name, x in (("lokr_w2_a", a), ("lokr_w2_b", b)):
            if x is None:
                raise ValueError(f"{lora_name}.{name} is missing (LoKr needs lokr_w2 or lokr_w2_a/lokr_w2_b)")
        if t is None:
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(f"{lora_name}: {_key(lora_name, 'lokr_w2_a', a)} and "
                                 f"{_key(lora_name, 'lokr_w2_b', b)} cannot be multiplied")
            w2 = (a.shape[0], b.shape[1])
        else:
            if not (a.ndim == 2 and b.ndim == 2 and t.ndim >= 3 and t.shape[0] == a.shape[0]
                    and t.shape[1] == b.shape[0]):
                raise ValueError(f"{lora_name}: Tucker factors {_key(lora_name, 'lokr_t2', t)}, "
                                 f"{_key(lora_name, 'lokr_w2_a', a)}, {_key(lora_name, 'lokr_w2_b', b)} "
                                 f"do not fit together")
            w2 = (a.shape[1], b.shape[1], *t.shape[2:])
    if len(w1) != 2:
        raise _shape_error(lora_name, shape, f"LoKr w1 must be 2-D, got {w1}")
    ok = w1[0] * w2[0] == shape[0]
    if len(w2) == 2:
        ok = ok and w1[1] * w2[1] == math.prod(shape[1:])
    else:
        ok = ok and len(w2) == len(shape) and w1[1] * w2[1] == shape[1] and w2[2:] == tuple(shape[2:])
    if not ok:
        raise _shape_error(lora_name, shape, f"kron(w1 {w1}, w2 {w2}) does not fit; keys: "
                           f"{', '.join(_key(lora_name, k, v) for k, v in sorted(p.items()) if k.startswith('lokr_'))}")


def _check_boft(lora_name, p, shape):
    blocks = p["oft_blocks"]
    if blocks.ndim != 4 or blocks.shape[2] != blocks.shape[3] or blocks.shape[1] * blocks.shape[2] != shape[0]:
        raise _shape_error(lora_name, shape, f"{_key(lora_name, 'oft_blocks', blocks)} is not (stages, blocks, b, b) "
                           f"with blocks*b == {shape[0]} output channels")
    rescale = p.get("rescale")
    if rescale is not None and (rescale.numel() != shape[0] or rescale.shape[0] != shape[0]):
        raise _shape_error(lora_name, shape, f"{_key(lora_name, 'rescale', rescale)} is not one value per output "
                           f"channel")


_CHECKS = {LohaModule: _check_loha, LokrModule: _check_lokr, ButterflyOFTModule: _check_boft}


def _allowed_params(cls) -> set:
    return set(cls.weight_list) - {"lokr_t1"}


def build_module_from_params(cls, lora_name, params: Dict[str, torch.Tensor], orig_module):
    """One adapter from its keys, after checking them; every key must end up in the adapter."""
    unknown = sorted(set(params) - _allowed_params(cls))
    if unknown:
        raise ValueError(f"unknown keys for a {cls.name} adapter: {[f'{lora_name}.{k}' for k in unknown]}")
    if "alpha" not in params:
        raise ValueError(f"{lora_name}.alpha is missing (LyCORIS files always store alpha; it sets the scale)")
    shape = _weight_shape(orig_module)
    _CHECKS[cls](lora_name, params, shape)
    sd = {f"{lora_name}.{k}": v for k, v in params.items()}
    try:
        with torch.no_grad():
            module = cls.make_module_from_state_dict(lora_name, orig_module, *cls.extract_state_dict(sd, lora_name))
    except Exception as exc:
        raise ValueError(f"{lora_name}: cannot build a {cls.name} adapter from keys "
                         f"{[_key(lora_name, k, v) for k, v in params.items()]}: {exc}") from exc
    if module is None:
        raise ValueError(f"{lora_name}: {cls.__name__}.make_module_from_state_dict returned None")
    _check_built(module, lora_name, params)
    return module


def _check_built(module, lora_name, params):
    """The adapter must hold exactly the file's tensors: no key dropped, reshaped or re-laid-out."""
    with torch.no_grad():
        built = module.state_dict()
    dropped = sorted(set(params) - set(built))
    added = sorted(set(built) - set(params))
    if dropped or added:
        raise ValueError(f"{lora_name}: the built adapter does not use keys {dropped} / expects keys {added}")
    for k, v in params.items():
        mine = built[k]
        if tuple(mine.shape) != tuple(v.shape):
            raise ValueError(f"{lora_name}.{k}: file shape {tuple(v.shape)} but the adapter has "
                             f"{tuple(mine.shape)}")
        if k != "alpha" and not torch.equal(mine.detach().cpu(), v.detach().cpu().to(mine.dtype)):
            raise ValueError(f"{lora_name}.{k}: the adapter does not hold the file's values after loading")


def build_modules(weights_sd, named_layers: Dict[str, nn.Module], *, what="model"):
    """Adapters for every `lora_name` in `weights_sd` found in `named_layers` ({lora_name: layer}).

    Names the model lacks and keys without a dot are reported with a warning naming them."""
    groups, loose = group_keys(checked_weights(weights_sd))
    if loose:
        logger.warning("ignoring keys that belong to no adapter: %s", _short(sorted(loose)))
    absent = sorted(n for n in groups if n not in named_layers)
    if absent:
        logger.warning("%d adapters in the file have no matching layer in the %s and were not loaded: %s",
                       len(absent), what, _short(absent))
    modules = []
    for lora_name, params in groups.items():
        layer = named_layers.get(lora_name)
        if layer is None:
            continue
        cls = detect_algo(lora_name, params)
        modules.append(build_module_from_params(cls, lora_name, params, layer))
    return modules


def _named_layers(prefix, model) -> Dict[str, nn.Module]:
    return {f"{prefix}_{name}".replace(".", "_"): m for name, m in model.named_modules()}

