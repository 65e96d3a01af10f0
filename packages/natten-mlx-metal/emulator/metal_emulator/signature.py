"""The text MLX wraps around an ``mx.fast.metal_kernel`` body, and its C++ twin for the emulator.

Reproduces MLX's ``write_signature`` (mlx/backend/common/metal_kernel.cpp; facts in
/work/shared/metal-kernel-facts.md section 1, checked against MLX 0.32):

- the header verbatim; ``template <...>`` when template arguments are given, in their order;
- ``[[kernel]] void custom_kernel_<name>...(`` then, per input, ``const device T* name`` (or
  ``const constant T* name`` when it has fewer than 8 elements, ``const constant T& name`` when it is
  0-d), each ``[[buffer(k)]]``; ``name_shape`` / ``name_strides`` / ``name_ndim`` only when the body
  contains that text and the input has ndim > 0; outputs ``device T* name``; then each thread
  attribute whose name occurs in the body, in MLX's fixed order;
- the explicit instantiation with ``[[host_name(...)]]``.

:func:`mlx_source` returns that Metal text (what MLX compiles, minus ``metal::utils()``);
:func:`cpp_source` the same parameter list as C++ for metal_shim.h plus an entry point that binds
the emulator's buffers and thread attributes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# MLX's attribute table: (name, type), in the order write_signature tests them.
ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# C++ expression of each attribute in the emulator (emu::cur: the running thread, emu::grp: its group)
_ATTR_EXPR = {
    "dispatch_quadgroups_per_threadgroup": "(uint)((emu::grp->nthreads + 3) / 4)",
    "dispatch_simdgroups_per_threadgroup": "(uint)emu::grp->nsg",
    "dispatch_threads_per_threadgroup": "uint3(emu::grp->tg_size[0], emu::grp->tg_size[1], emu::grp->tg_size[2])",
    "grid_origin": "uint3(0, 0, 0)",
    "grid_size": "uint3(emu::launch->grid[0], emu::launch->grid[1], emu::launch->grid[2])",
    "quadgroup_index_in_threadgroup": "(uint)(emu::cur->tid / 4)",
    "quadgroups_per_threadgroup": "(uint)((emu::grp->nthreads + 3) / 4)",
    "simdgroup_index_in_threadgroup": "(uint)emu::cur->sg",
    "simdgroups_per_threadgroup": "(uint)emu::grp->nsg",
    "thread_execution_width": "(uint)32",
    "thread_index_in_quadgroup": "(uint)(emu::cur->tid % 4)",
    "thread_index_in_simdgroup": "(uint)emu::cur->lane",
    "thread_index_in_threadgroup": "(uint)emu::cur->tid",
    "thread_position_in_grid": "uint3(emu::cur->pos_grid[0], emu::cur->pos_grid[1], emu::cur->pos_grid[2])",
    "thread_position_in_threadgroup": "uint3(emu::cur->pos_tg[0], emu::cur->pos_tg[1], emu::cur->pos_tg[2])",
    "threadgroup_position_in_grid": "uint3(emu::cur->group[0], emu::cur->group[1], emu::cur->group[2])",
    "threadgroups_per_grid": "uint3(emu::grp->groups[0], emu::grp->groups[1], emu::grp->groups[2])",
    "threads_per_grid": "uint3(emu::launch->grid[0], emu::launch->grid[1], emu::launch->grid[2])",
    "threads_per_simdgroup": "(uint)32",
    "threads_per_threadgroup": "uint3(emu::grp->tg_size[0], emu::grp->tg_size[1], emu::grp->tg_size[2])",
}

# numpy dtype -> MLX's Metal type name (mlx/backend/common/compiled.cpp get_type_string)
_TYPE = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "float64": "double",
    "bool": "bool",
    "int8": "int8_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "int64": "int64_t",
    "uint8": "uint8_t",
    "uint16": "uint16_t",
    "uint32": "uint32_t",
    "uint64": "uint64_t",
}


def type_name(dtype: str) -> str:
    try:
        return _TYPE[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype!r} has no Metal type in MLX's table; known: {sorted(_TYPE)}") from None


class SignatureError(ValueError):
    """MLX would generate a signature that does not compile (or one the emulator cannot model)."""


@dataclass(frozen=True)
class Param:
    """One parameter of the generated signature."""

    name: str
    kind: str  # "input", "shape", "strides", "ndim", "output", "attr"
    mtype: str  # Metal parameter type text, without the name
    buffer: int = -1  # [[buffer(k)]] index, -1 for attributes
    source: int = -1  # input/output position this parameter describes
    dtype: str = ""  # element dtype name of a buffer


@dataclass(frozen=True)
class Signature:
    """Everything write_signature decides for one (kernel, call)."""

    kernel_name: str  # custom_kernel_<name>... (the host name)
    template: tuple  # ((name, value), ...) as given
    params: tuple = field(default_factory=tuple)


def _template_value(v) -> tuple[str, str]:
    """(declaration kind, text) of one template argument, as MLX prints it."""
    if isinstance(v, bool):
        return "bool", "1" if v else "0"
    if isinstance(v, (int, np.integer)):
        return "int", str(int(v))
    name = v if isinstance(v, str) else getattr(v, "name", None) or str(v)
    return "typename", type_name(_dtype_name(name))


def _dtype_name(d) -> str:
    s = str(d)
    if s.startswith("mlx.core."):
        s = s[len("mlx.core.") :]
    return s


def build_signature(
    name: str,
    input_names,
    output_names,
    source: str,
    input_shapes,
    input_dtypes,
    output_dtypes,
    template=(),
    atomic_outputs: bool = False,
) -> Signature:
    """Decide the parameter list MLX generates for these inputs (shapes/dtypes) and this body."""
    if atomic_outputs:
        raise SignatureError("atomic_outputs=True is not modelled by the emulator")
    params = []
    k = 0
    for pos, (iname, shape, dt) in enumerate(zip(input_names, input_shapes, input_dtypes)):
        t = type_name(_dtype_name(dt))
        size = int(np.prod(shape)) if len(shape) else 1
        if len(shape) == 0:
            mtype = f"const constant {t}&"
        elif size < 8:
            mtype = f"const constant {t}*"
        else:
            mtype = f"const device {t}*"
        params.append(Param(iname, "input", mtype, k, pos, _dtype_name(dt)))
        k += 1
        if len(shape) > 0:
            if f"{iname}_shape" in source:
                params.append(Param(f"{iname}_shape", "shape", "const constant int*", k, pos, "int32"))
                k += 1
            if f"{iname}_strides" in source:
                params.append(Param(f"{iname}_strides", "strides", "const constant int64_t*", k, pos, "int64"))
                k += 1
            if f"{iname}_ndim" in source:
                params.append(Param(f"{iname}_ndim", "ndim", "const constant int&", k, pos, "int32"))
                k += 1
    for pos, (oname, dt) in enumerate(zip(output_names, output_dtypes)):
        t = type_name(_dtype_name(dt))
        params.append(Param(oname, "output", f"device {t}*", k, pos, _dtype_name(dt)))
        k += 1
    if k > 31:
        raise SignatureError(f"{k} buffers: Metal binds at most 31 buffers to a kernel")
    attrs = [Param(a, "attr", t) for a, t in ATTRIBUTES if a in source]
    # MLX closes the parameter list after the buffer whose index is #inputs + #outputs - 1 when no
    # attribute follows; shape/stride/ndim buffers shift the last output past that index.
    if not attrs and len(params) > len(input_names) + len(output_names) and len(output_names) >= 2:
        raise SignatureError(
            "MLX generates a broken signature for this kernel: it uses shape/strides/ndim buffers, has "
            f"{len(output_names)} outputs and no thread attribute (the closing-parenthesis test in "
            "write_signature compares the buffer index with #inputs + #outputs - 1)"
        )
    params.extend(attrs)
    kname = f"custom_kernel_{name}"
    if template:
        # MLX: "_" + the template text with "<", ">" and ", " turned into "_", last character dropped
        text = "<" + ", ".join(_template_value(v)[1] for _, v in template) + ">"
        kname += "_" + text.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    return Signature(kname, tuple(template), tuple(params))


def mlx_source(sig: Signature, header: str, source: str) -> str:
    """The Metal text MLX generates (without metal::utils())."""
    out = [header, ""]
    if sig.template:
        decl = ", ".join(f"{_template_value(v)[0]} {n}" for n, v in sig.template)
        out.append(f"template <{decl}>")
    lines = []
    for p in sig.params:
        if p.kind == "attr":
            lines.append(f"  {p.mtype} {p.name} [[{p.name}]]")
        else:
            lines.append(f"  {p.mtype} {p.name} [[buffer({p.buffer})]]")
    out.append(f"[[kernel]] void {sig.kernel_name}(")
    out.append(",\n".join(lines) + ") {")
    out.append(source)
    out.append("}")
    if sig.template:
        args = ", ".join(_template_value(v)[1] for _, v in sig.template)
        out.append(
            f'template [[host_name("{sig.kernel_name}")]] [[kernel]] decltype({sig.kernel_name}<{args}>) '
            f"{sig.kernel_name}<{args}>;"
        )
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Rewriting Metal text into checked C++ (see metal_shim.h)
# --------------------------------------------------------------------------------------

_TYPE_RE = r"[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?"
_PTR_RE = re.compile(
    r"(?P<c1>\bconst\s+)?\b(?P<as>device|threadgroup|constant)\s+(?P<c2>const\s+)?(?P<t>" + _TYPE_RE + r")\s*(?P<c3>const\s*)?\*"
)
_TG_ARRAY_RE = re.compile(r"\bthreadgroup\s+(?P<t>" + _TYPE_RE + r")\s+(?P<n>[A-Za-z_]\w*)\s*\[(?P<e>[^\]]+)\](?P<rest>\s*[\[=;])")
_AS_REF_RE = re.compile(r"\b(device|threadgroup)\s+(const\s+)?" + _TYPE_RE + r"\s*&")
_WRAPPER = {"device": "::emu::dptr", "threadgroup": "::emu::tptr", "constant": "::emu::cptr"}


def rewrite(text: str, site_base: int = 0) -> tuple[str, int]:
    """Metal address-space pointer types and threadgroup arrays -> emulator wrapper types.

    Returns the text and the number of threadgroup array sites used. Raises SignatureError for
    forms the emulator does not model (multi-dimensional or initialised threadgroup arrays,
    references into device/threadgroup memory)."""
    sites = [site_base]

    def tg_array(m):
        if m.group("rest").strip() != ";":
            raise SignatureError(
                f"threadgroup array {m.group('n')!r}: only one-dimensional arrays without initialiser are emulated"
            )
        site = sites[0]
        sites[0] += 1
        return f'::emu::tg_array<{m.group("t")}, (int64_t)({m.group("e")})> {m.group("n")}({site}, "{m.group("n")}");'

    text = _TG_ARRAY_RE.sub(tg_array, text)
    m = _AS_REF_RE.search(text)
    if m:
        raise SignatureError(f"reference into {m.group(1)} memory ({m.group(0)!r}) is not emulated; index the pointer instead")

    def ptr(m):
        const = "const " if (m.group("c1") or m.group("c2") or m.group("c3")) else ""
        return f"{_WRAPPER[m.group('as')]}<{const}{m.group('t')}> "

    return _PTR_RE.sub(ptr, text), sites[0] - site_base


# C++ that compiles here but not as Metal: the emulator refuses it rather than run it
_NOT_MSL = (
    (re.compile(r"\bstd::"), "the C++ standard library (std::) does not exist in Metal"),
    (re.compile(r"\bdouble\b"), "Metal has no double"),
    (re.compile(r"#\s*include\s*[<\"](?!metal_)"), "only Metal's own headers can be included"),
    (re.compile(r"\b(printf|malloc|free)\s*\("), "no C library calls in Metal"),
    (re.compile(r"\b(new|delete)\s+[A-Za-z_(]|\bthrow\b|\btry\s*\{|\bcatch\s*\("),
     "no dynamic allocation or exceptions in Metal"),
    (re.compile(r"\b(virtual|dynamic_cast|typeid|thread_local)\b"), "not available in Metal"),
    (re.compile(r"\b__builtin_\w+"), "compiler built-ins of the emulator's C++ compiler are not Metal"),
)
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def check_msl(text: str, what: str) -> None:
    """Refuse constructs that are C++ but not Metal Shading Language (comments ignored)."""
    code = _COMMENT.sub(" ", text)
    for pattern, why in _NOT_MSL:
        m = pattern.search(code)
        if m:
            raise SignatureError(f"{what}: {m.group(0).strip()!r}: {why}")


def _cpp_param_type(p: Param) -> str:
    if p.kind == "attr":
        return p.mtype
    if p.mtype.endswith("&"):
        return p.mtype.replace("constant ", "")
    t, _ = rewrite(p.mtype)
    return t.strip()


def cpp_source(sig: Signature, header: str, source: str) -> str:
    """C++ translation unit for the emulator: shim, header, kernel and the entry point emu_main."""
    check_msl(header, "header")
    check_msl(source, "kernel body")
    h, nh = rewrite(header)
    body, _ = rewrite(source, nh)
    out = ['#include "metal_shim.h"', "", "// ---- header ----", h, "// ---- kernel ----"]
    if sig.template:
        decl = ", ".join(f"{_template_value(v)[0]} {n}" for n, v in sig.template)
        out.append(f"template <{decl}>")
    plist = ",\n".join(f"    {_cpp_param_type(p)} {p.name}" for p in sig.params)
    out.append(f"void {sig.kernel_name}(\n{plist}) {{")
    out.append("#line 1 \"kernel-body\"")
    out.append(body)
    out.append("}")
    # entry: bind buffers in order, then attributes
    args = []
    for p in sig.params:
        if p.kind == "attr":
            args.append(_ATTR_EXPR[p.name])
        elif p.mtype.endswith("&"):
            base = p.mtype.replace("const constant ", "").rstrip("&").strip()
            args.append(f"*reinterpret_cast<const {base}*>(emu::launch->bufs[{p.buffer}].data)")
        else:
            args.append(f"{_cpp_param_type(p)}(&emu::launch->bufs[{p.buffer}], 0)")
    targs = ""
    if sig.template:
        targs = "<" + ", ".join(_template_value(v)[1] for _, v in sig.template) + ">"
    out.append("static void emu_entry() {")
    out.append(f"  {sig.kernel_name}{targs}(" + ", ".join(args) + ");")
    out.append("}")
    out.append('extern "C" int emu_main(emu::Launch* L) { return emu::run(L, &emu_entry); }')
    return "\n".join(out) + "\n"
