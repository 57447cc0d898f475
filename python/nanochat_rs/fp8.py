"""fp8 training for Linear layers: tensorwise dynamic scaling and `torch._scaled_mm` GEMMs.

Forward quantises the input and the weight to e4m3 (each with one scale for the whole tensor, from
its current absolute maximum) and runs `input @ weight.T` in fp8. Backward quantises the incoming
gradient to e5m2 (wider range, less precision: gradients span more orders of magnitude) and runs
both gradient GEMMs in fp8 against the *saved quantised* input and weight. Saving the fp8 tensors
and their inverse scales instead of the originals means backward never re-quantises them (same
numerics, less work) and the saved activation takes 1 byte per element instead of 2-4.

`torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=...)` computes (a * scale_a) @ (b * scale_b)
and requires `a` row-major, `b` column-major, and the inner and output dims divisible by 16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)
# All-zero tensors have amax 0; clamping keeps the scale finite (the quantised tensor is then all 0).
AMAX_EPS = 1e-12
# _scaled_mm needs the contraction and output dims divisible by 16.
FP8_DIM_MULTIPLE = 16

ModuleFilter = Callable[[nn.Module, str], bool]


def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensorwise dynamic quantisation: (x_fp8, inv_scale) with x ~= x_fp8.float() * inv_scale.

    scale = fp8_max / amax(x) maps the largest magnitude onto the top of the fp8 range; values are
    clamped into range before the cast because the cast itself does not saturate. inv_scale is a
    0-d fp32 tensor, the form `torch._scaled_mm` takes its scales in.
    """
    if dtype not in FP8_DTYPES:
        raise ValueError(f"fp8 dtype must be one of {FP8_DTYPES}, got {dtype}")
    if not x.is_floating_point():
        raise TypeError(f"to_fp8 needs a floating-point tensor, got {x.dtype}")
    fp8_max = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp_min(AMAX_EPS)
    scale = fp8_max / amax
    x_fp8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)
    return x_fp8, scale.reciprocal()


def _scaled_matmul(a: torch.Tensor, b: torch.Tensor, inv_scale_a: torch.Tensor, inv_scale_b: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    return torch._scaled_mm(a, b, scale_a=inv_scale_a, scale_b=inv_scale_b, out_dtype=out_dtype)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """Same values and shape, column-major memory layout (what _scaled_mm wants for its 2nd operand)."""
    return t.t().contiguous().t()


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 0 up to a multiple; zero rows add nothing to a product contracted over dim 0."""
    rows = t.size(0)
    padded_rows = -(-rows // multiple) * multiple
    if padded_rows == rows:
        return t
    out = torch.zeros((padded_rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:rows].copy_(t)
    return out


class _Float8Matmul(torch.autograd.Function):
    """y = x @ w.T for a 2-D x (M, K) and w (N, K), all three GEMMs in fp8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x_fp8, x_inv_scale = to_fp8(x, E4M3)
        w_fp8, w_inv_scale = to_fp8(weight, E4M3)
        ctx.save_for_backward(x_fp8, x_inv_scale, w_fp8, w_inv_scale)
        ctx.input_dtype = x.dtype
        ctx.weight_dtype = weight.dtype
        # w_fp8.t() is a column-major (K, N) view of the row-major (N, K) weight: no copy needed.
        return _scaled_matmul(x_fp8, w_fp8.t(), x_inv_scale, w_inv_scale, x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x_fp8, x_inv_scale, w_fp8, w_inv_scale = ctx.saved_tensors
        g_fp8, g_inv_scale = to_fp8(grad_output, E5M2)
        g_fp8 = g_fp8.contiguous()
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            # (M, N) @ (N, K)
            grad_input = _scaled_matmul(g_fp8, _column_major(w_fp8), g_inv_scale, w_inv_scale, ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            # (N, M) @ (M, K): M (the token count) becomes the contraction dim, which _scaled_mm needs
            # divisible by 16, so pad it with zero rows (they contribute nothing to the sum).
            g_t = _pad_rows(g_fp8, FP8_DIM_MULTIPLE).t().contiguous()
            x_cm = _column_major(_pad_rows(x_fp8, FP8_DIM_MULTIPLE))
            grad_weight = _scaled_matmul(g_t, x_cm, g_inv_scale, x_inv_scale, ctx.weight_dtype)
        return grad_input, grad_weight


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in fp8 while `fp8_enabled` (see `disable_fp8` for plain eval)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        _check_fp8_dims(in_features, out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_enabled = True

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        """A Float8Linear sharing `linear`'s Parameter objects (optimizer references stay valid)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_enabled:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(x, self.weight.to(x.dtype), bias)
        if x.size(-1) != self.in_features:
            raise ValueError(f"Float8Linear expects last dim {self.in_features}, got input shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        out = _Float8Matmul.apply(x.reshape(-1, self.in_features), self.weight)
        out = out.reshape(*lead, self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_enabled={self.fp8_enabled}"


def _check_fp8_dims(in_features: int, out_features: int) -> None:
    if in_features % FP8_DIM_MULTIPLE or out_features % FP8_DIM_MULTIPLE:
        raise ValueError(f"Float8Linear needs in/out features divisible by {FP8_DIM_MULTIPLE}, "
                         f"got in_features={in_features}, out_features={out_features}")


def is_fp8_eligible(module: nn.Module) -> bool:
    """A (not yet converted) nn.Linear whose dims _scaled_mm can handle."""
    return (isinstance(module, nn.Linear) and not isinstance(module, Float8Linear)
            and module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0)


def convert_to_float8_training(model: nn.Module, module_filter_fn: ModuleFilter | None = None) -> nn.Module:
    """Swap every eligible nn.Linear (subclasses included) for a Float8Linear, in place.

    `module_filter_fn(module, fully_qualified_name) -> bool` narrows the choice further; the
    divisible-by-16 requirement always applies. Weights (the same Parameter objects) are kept.
    Returns `model`, or the replacement if `model` itself is an eligible Linear (it has no parent).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_to_float8_training needs an nn.Module, got {type(model).__name__}")

    def wanted(module: nn.Module, fqn: str) -> bool:
        return is_fp8_eligible(module) and (module_filter_fn is None or bool(module_filter_fn(module, fqn)))

    if wanted(model, ""):
        return Float8Linear.from_linear(model)  # type: ignore[arg-type]
    # Collect first: swapping while iterating named_modules would walk into the new modules.
    targets = [(fqn, module) for fqn, module in model.named_modules() if fqn and wanted(module, fqn)]
    for fqn, module in targets:
        parent_name, _, child_name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, Float8Linear.from_linear(module))  # type: ignore[arg-type]
    return model


@contextlib.contextmanager
def disable_fp8(model: nn.Module) -> Iterator[nn.Module]:
    """Run every Float8Linear in `model` with plain matmuls inside the block (e.g. for evaluation)."""
    modules = [m for m in model.modules() if isinstance(m, Float8Linear)]
    previous = [m.fp8_enabled for m in modules]
    for m in modules:
        m.fp8_enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(modules, previous, strict=True):
            m.fp8_enabled = enabled


_SCALED_MM_SUPPORT: dict[str, bool] = {}


def scaled_mm_supported(device: torch.device | str) -> bool:
    """Whether torch._scaled_mm runs on this device (a tiny probe, cached per device type).

    CUDA needs compute capability >= 8.9 for fp8; CPU support depends on the torch build.
    """
    device = torch.device(device)
    if device.type not in _SCALED_MM_SUPPORT:
        _SCALED_MM_SUPPORT[device.type] = _probe_scaled_mm(device)
    return _SCALED_MM_SUPPORT[device.type]


def _probe_scaled_mm(device: torch.device) -> bool:
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda" and (not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (8, 9)):
        return False
    try:
        a = torch.ones((16, 16), device=device).to(E4M3)
        one = torch.ones((), device=device)
        _scaled_matmul(a, a.t(), one, one, torch.float32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True
