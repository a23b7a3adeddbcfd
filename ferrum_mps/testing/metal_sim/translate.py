"""Metal Shading Language -> C++ for clang: textual fix-ups and kernel entry points.

Works on preprocessed source (no comments, macros expanded). What it rewrites:
- unsuffixed float literals get `f` (Metal has no double), `1.0h` becomes a half;
- `float4(...)` constructors and `(float4)x` casts convert element-wise (clang would
  bitcast an equal-size vector);
- `threadgroup T name[N];` in a kernel body becomes a reference to storage owned by
  the threadgroup (each fiber would otherwise get its own copy);
- Metal attributes (`[[buffer(0)]]`, `[[host_name("x")]]`...) are parsed, then removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SCALARS = "float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool"
_VEC = rf"(?:packed_)?(?:{_SCALARS})[234]"
_VEC_RE = re.compile(rf"(?<![\w.:>])({_VEC})\s*\(")
_CAST_RE = re.compile(rf"\(\s*(?:const\s+)?({_VEC})\s*\)")
_FLOAT_RE = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)([fFhH]?)(?![\w.])")
_STRING_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_TG_DECL_RE = re.compile(
    r"(?<![\w:])threadgroup\s+((?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+([A-Za-z_]\w*)\s*((?:\[[^\];]+\]\s*)*);"
)
_ATTR_RE = re.compile(r"\[\[(.*?)\]\]", re.S)
_KEEP_ATTRS = {"likely", "unlikely", "maybe_unused", "fallthrough", "nodiscard", "noreturn", "clang::always_inline"}
_TEMPLATE_FUNCS = {"as_type", "static_cast", "reinterpret_cast", "const_cast", "convert_type", "__msl_make", "__msl_cv"}

# Built-in attribute -> C++ array expression (uint[3]) in the generated thunk.
BUILTINS = {
    "thread_position_in_grid": "__t->tpig",
    "thread_position_in_threadgroup": "__t->tpitg",
    "threadgroup_position_in_grid": "__g->tgpig",
    "threads_per_threadgroup": "__g->tptg",
    "dispatch_threads_per_threadgroup": "__g->dtptg",
    "threadgroups_per_grid": "__g->tgpg",
    "threads_per_grid": "__g->tpg",
    "grid_size": "__g->tpg",
    "grid_origin": "__zero",
    "thread_index_in_threadgroup": "__tiitg",
    "thread_index_in_simdgroup": "__lane",
    "simdgroup_index_in_threadgroup": "__sgitg",
    "threads_per_simdgroup": "__w32",
    "thread_execution_width": "__w32",
    "simdgroups_per_threadgroup": "__nsimd",
    "dispatch_simdgroups_per_threadgroup": "__dnsimd",
    "thread_index_in_quadgroup": "__qlane",
    "quadgroup_index_in_threadgroup": "__qidx",
    "quadgroups_per_threadgroup": "__nquad",
}


class MetalTranslationError(SyntaxError):
    pass


@dataclass
class Param:
    name: str
    type: str
    buffer: int | None = None
    builtin: str | None = None


@dataclass
class KernelDef:
    name: str
    params: list[Param]
    max_threads: int | None = None


@dataclass
class Entry:
    """A callable kernel: `host` is the name Python uses, `expr` the C++ function."""

    host: str
    expr: str
    kernel: KernelDef
    index: int = 0
    arginfo: list = field(default_factory=list)


def _match(s: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket matching s[i] == open_."""
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise MetalTranslationError(f"unbalanced {open_!r} at offset {i}")


def _match_angle(s: str, i: int) -> int:
    depth = 0
    j = i
    while j < len(s):
        c = s[j]
        if c == "(":
            j = _match(s, j, "(", ")")
            continue
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
            if depth == 0:
                return j + 1
        elif c in ";{}":
            break
        j += 1
    raise MetalTranslationError(f"unbalanced '<' at offset {i}")


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


_IDENT = re.compile(r"[A-Za-z_][\w]*(?:\s*::\s*[A-Za-z_]\w*)*|\d[\w.]*(?:[eE][+-]\d+)?[\w]*|\.\d[\w.]*")


def _scan_operand(s: str, i: int) -> int:
    """End of the cast-expression starting at s[i] (what a C cast applies to)."""
    i = _skip_ws(s, i)
    while i < len(s) and s[i] in "-+!~*&":
        i = _skip_ws(s, i + (2 if s[i : i + 2] in ("++", "--") else 1))
    if i < len(s) and s[i] == "(":
        i = _match(s, i, "(", ")")
    else:
        m = _IDENT.match(s, i)
        if not m:
            raise MetalTranslationError(f"cannot parse the operand of a vector cast near: {s[i:i + 40]!r}")
        i = m.end()
        j = _skip_ws(s, i)
        if j < len(s) and s[j] == "<" and m.group(0).split("::")[-1].strip() in _TEMPLATE_FUNCS:
            i = _match_angle(s, j)
    while True:
        j = _skip_ws(s, i)
        if j < len(s) and s[j] == "(":
            i = _match(s, j, "(", ")")
        elif j < len(s) and s[j] == "[":
            i = _match(s, j, "[", "]")
        elif s.startswith("->", j) or (j < len(s) and s[j] == "." and not s[j + 1 : j + 2].isdigit()):
            k = _skip_ws(s, j + (2 if s[j] == "-" else 1))
            m = re.compile(r"[A-Za-z_]\w*").match(s, k)
            if not m:
                break
            i = m.end()
        elif s.startswith("++", j) or s.startswith("--", j):
            i = j + 2
        else:
            return i


def _rewrite_casts(s: str) -> str:
    # Right to left, so an inner cast is already a call when the outer one is scanned.
    for m in reversed(list(_CAST_RE.finditer(s))):
        before = s[: m.start()].rstrip()
        prev_word = re.search(r"(\w+)$", before)
        if before and (before[-1] in ")]>" or (prev_word and prev_word.group(1) not in ("return", "else", "case"))):
            continue  # sizeof(float4), f(float4): not a cast
        end = _scan_operand(s, m.end())
        s = s[: m.start()] + f"__msl_cv<{m.group(1)}>(" + s[m.end() : end] + ")" + s[end:]
    return s


_CMP_RE = re.compile(r"==|!=|<=|>=|\s<\s|\s>\s")


def _top_level(text: str) -> str:
    """`text` with everything inside brackets blanked out."""
    out, depth = [], 0
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        out.append(c if depth == 0 else " ")
    return "".join(out)


def _bool_conversions(s: str) -> str:
    # Vector comparisons give clang masks (-1/0); Metal converts its bool vectors to 1/0.
    for m in reversed(list(re.finditer(r"__msl_(?:make|cv)<(\w+)>\(", s))):
        end = _match(s, m.end() - 1, "(", ")")
        arg = s[m.end() : end - 1]
        top = _top_level(arg)
        if "," not in top and _CMP_RE.search(" " + top + " "):
            s = s[: m.start()] + f"__msl_cvb<{m.group(1)}>(" + s[m.end() :]
    return s


def _float_literal(m: re.Match) -> str:
    num, suffix = m.group(1), m.group(2)
    if suffix in ("h", "H"):
        return f"((half){num}f)"
    if suffix in ("f", "F"):
        return m.group(0)
    return num + "f"


def _split_params(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for c in text:
        if c in "(<[{":
            depth += 1
        elif c in ")>]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur))
    return [p.strip() for p in out if p.strip()]


def _parse_params(kname: str, text: str) -> list[Param]:
    params: list[Param] = []
    used: set[int] = set()
    pending: list[Param] = []
    for raw in _split_params(text):
        attrs = [a.strip() for a in _ATTR_RE.findall(raw)]
        decl = _ATTR_RE.sub(" ", raw).strip()
        m = re.search(r"([A-Za-z_]\w*)\s*$", decl)
        if not m:
            raise MetalTranslationError(f"kernel {kname}: cannot parse parameter {raw!r}")
        p = Param(name=m.group(1), type=decl[: m.start()].strip())
        for a in attrs:
            am = re.fullmatch(r"buffer\s*\(\s*(\d+)\s*\)", a)
            if am:
                p.buffer = int(am.group(1))
                used.add(p.buffer)
            elif a in BUILTINS:
                p.builtin = a
            elif a.startswith("threadgroup"):
                raise MetalTranslationError(
                    f"kernel {kname}: parameter {p.name!r} uses [[{a}]] (dynamic threadgroup memory), which "
                    "torch.mps.compile_shader cannot bind: declare a static `threadgroup T name[N];` in the body"
                )
            else:
                raise MetalTranslationError(f"kernel {kname}: unsupported parameter attribute [[{a}]] on {p.name!r}")
        if p.buffer is None and p.builtin is None:
            pending.append(p)
        params.append(p)
    nxt = 0
    for p in pending:  # Metal numbers unannotated buffers in order
        while nxt in used:
            nxt += 1
        p.buffer = nxt
        used.add(nxt)
    return params


def _find_kernels(s: str):
    """Kernel definitions, explicit instantiations as (host_name, function, template args), and edits.

    Edits (start, end, replacement) make the per-kernel build text: definitions become
    `static` (an unused kernel is then never compiled) and explicit instantiations go
    (the entry point instantiates the one kernel it calls).
    """
    defs: dict[str, KernelDef] = {}
    insts: list[tuple[str, str, str]] = []
    edits: list[tuple[int, int, str]] = []
    templated: set[str] = set()
    for m in re.finditer(r"(?<![\w])kernel\s+", s):
        head = s[max(0, m.start() - 400) : m.start()]
        i = m.end()
        rm = re.compile(r"(?:\[\[.*?\]\]\s*)*([A-Za-z_][\w:]*)\s+(?:\[\[.*?\]\]\s*)*([A-Za-z_]\w*)\s*").match(s, i)
        if not rm:
            continue
        name = rm.group(2)
        j = rm.end()
        targs = None
        if j < len(s) and s[j] == "<":
            k = _match_angle(s, j)
            targs = s[j + 1 : k - 1].strip()
            j = _skip_ws(s, k)
        hm = re.search(r"template\s*\[\[\s*host_name\s*\(\s*((?:\"[^\"]*\"\s*)+)\)\s*\]\]\s*$", head)
        if hm:
            host = "".join(re.findall(r'"([^"]*)"', hm.group(1)))
            insts.append((host, name, targs or ""))
            stop = s.index(";", j)
            edits.append((m.start() - (len(head) - hm.start()), stop + 1, ""))
            continue
        if j >= len(s) or s[j] != "(":
            continue
        k = _match(s, j, "(", ")")
        after = _skip_ws(s, k)
        while s.startswith("[[", after):
            after = _skip_ws(s, s.index("]]", after) + 2)
        if after < len(s) and s[after] == "{":
            kd = KernelDef(name=name, params=_parse_params(name, s[j + 1 : k - 1]))
            mt = re.search(r"max_total_threads_per_threadgroup\s*\(\s*(\d+)\s*\)", s[m.start() : j])
            if mt:
                kd.max_threads = int(mt.group(1))
            defs[name] = kd
            if re.search(r">\s*(?:\[\[[^\]]*\]\]\s*)*$", head):
                templated.add(name)
            edits.append((m.start(), m.start() + len("kernel"), "static"))
    return defs, insts, edits, templated


def translate(pre: str) -> tuple[str, str, list[Entry], list[str]]:
    """Rewrite preprocessed MSL into C++ to follow the prelude.

    Returns (build text, check text, entries, threadgroup variable names by id): the build text has no explicit
    instantiations (append `entry_code([e])` to build kernel e alone); the check text
    keeps them, for the address-space pass to instantiate every kernel.
    """
    strings: list[str] = []

    def keep(m: re.Match) -> str:
        strings.append(m.group(0))
        return f"__MSL_STR{len(strings) - 1}__"

    s = _STRING_RE.sub(keep, pre)
    s = _FLOAT_RE.sub(_float_literal, s)
    s = _VEC_RE.sub(lambda m: f"__msl_make<{m.group(1)}>(", s)
    s = _rewrite_casts(s)
    s = _bool_conversions(s)
    tg_names: list[str] = []

    def tg(m: re.Match) -> str:
        t = f"{m.group(1)} {m.group(3).strip()}"
        tg_names.append(m.group(2))
        return (
            f"__msl_tgref<threadgroup {t}> {m.group(2)} = *(__msl_tgptr<threadgroup {t}>)"
            f"__msl_api->tg_alloc({len(tg_names) - 1}, sizeof({t}), alignof({t}));"
        )

    s = _TG_DECL_RE.sub(tg, s)
    s = re.sub(r"__MSL_STR(\d+)__", lambda m: strings[int(m.group(1))], s)

    defs, insts, edits, templated = _find_kernels(s)
    entries: list[Entry] = []
    for name, kd in defs.items():
        if name not in templated:
            entries.append(Entry(host=name, expr=name, kernel=kd))
    for host, fn, targs in insts:
        kd = defs.get(fn)
        if kd is None:
            raise MetalTranslationError(f"host_name({host!r}) instantiates {fn!r}, whose definition was not found")
        entries.append(Entry(host=host, expr=f"{fn}<{targs}>" if targs else fn, kernel=kd))
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if e.host in seen:
            raise MetalTranslationError(f"two kernels are named {e.host!r}")
        seen.add(e.host)
        e.index = i

    build = s
    for a, b, rep in sorted(edits, reverse=True):
        build = build[:a] + rep + build[b:]
    strip = lambda t: _ATTR_RE.sub(lambda m: m.group(0) if m.group(1).strip() in _KEEP_ATTRS else " ", t)  # noqa: E731
    return strip(build), strip(s), entries, tg_names


def entry_code(entries: list[Entry]) -> str:
    """The exported table `__msl_entries` with a thunk per entry (binds buffers and built-ins)."""
    out = [
        "\n// ---- generated entry points ----",
        "struct __msl_entry { const char* name; void (*thunk)(void**); const __msl_arginfo* info; "
        "const int* buffer_index; int nbuf; int max_threads; };",
    ]
    for e in entries:
        i = e.index
        F = f"__msl_F{i}"
        out.append(f"typedef decltype(&{e.expr}) {F};")
        args = []
        bufs = []
        for j, p in enumerate(e.kernel.params):
            if p.builtin:
                args.append(f"__msl_builtin<__msl_param_t<{F}, {j}>>({BUILTINS[p.builtin]})")
            else:
                args.append(f"__msl_bind<__msl_param_t<{F}, {j}>>::get(__b[{p.buffer}])")
                bufs.append((p.buffer, j))
        out.append(
            f"static void __msl_thunk{i}(void** __b) {{\n"
            "  MslThread* __t = __msl_api->cur; MslGrid* __g = __msl_api->grid; (void)__t; (void)__g; (void)__b;\n"
            "  const uint __zero[3] = {0, 0, 0}, __w32[3] = {32, 0, 0};\n"
            "  const uint __tiitg[3] = {__t->index, 0, 0}, __lane[3] = {__t->lane, 0, 0}, "
            "__sgitg[3] = {__t->sgitg, 0, 0};\n"
            "  const uint __nsimd[3] = {__g->nsimd, 0, 0}, __dnsimd[3] = {__g->dnsimd, 0, 0};\n"
            "  const uint __qlane[3] = {__t->index % 4, 0, 0}, __qidx[3] = {__t->index / 4, 0, 0}, "
            "__nquad[3] = {(__g->nthreads + 3) / 4, 0, 0};\n"
            f"  {e.expr}({', '.join(args)});\n}}"
        )
        info = ", ".join(f"__msl_info<__msl_param_t<{F}, {j}>>()" for _, j in bufs) or "{}"
        idx = ", ".join(str(b) for b, _ in bufs) or "0"
        out.append(f"static constexpr __msl_arginfo __msl_info{i}[] = {{{info}}};")
        out.append(f"static const int __msl_bidx{i}[] = {{{idx}}};")
    rows = ", ".join(
        f'{{"{e.host}", __msl_thunk{e.index}, __msl_info{e.index}, __msl_bidx{e.index}, '
        f"{sum(1 for p in e.kernel.params if not p.builtin)}, {e.kernel.max_threads or 1024}}}"
        for e in entries
    )
    out.append(
        f'extern "C" __attribute__((visibility("default"))) const int __msl_nentries = {len(entries)};'
    )
    out.append(
        'extern "C" __attribute__((visibility("default"))) const __msl_entry __msl_entries[] = '
        f"{{{rows or '{0, 0, 0, 0, 0, 0}'}}};"
    )
    return "\n".join(out) + "\n"
