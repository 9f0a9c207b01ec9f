"""Jinja for data templates (data.prompt_template / response_template), bounded in time and memory.

A template is the recipe author's code run once per row, so a slip such as `{{ 'x' * 10**9 }}` or
`{% for i in range(10**9) %}` must end in an error naming the row, not in a hung or swapping machine. The rules,
all here: jinja2's ImmutableSandboxedEnvironment (no attribute tricks, no mutation of the row), plus

  - output: one rendering writes at most `limit` characters (data.max_row_bytes, default 8 MiB); every
    string or list built on the way (`*`, `+`, `~`, `%`, filters, method calls) is held to the same limit,
    checked before it is built where its size is known in advance;
  - numbers: a call or filter argument above `limit` is refused (`center(10**9)`), and `**` may not make an
    integer over 4300 digits (Python's own int/str limit);
  - loops: one range() has at most MAX_RANGE items, and one rendering iterates at most MAX_LOOP_STEPS range
    items in all (nested loops), so a loop that writes nothing still ends.

Whatever a template builds by other means (a chain of `replace`s on huge strings, say) is not bounded here.
"""

from __future__ import annotations

import math
import re
import string
import threading
from typing import Any

from jinja2 import StrictUndefined
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import TemplateRuntimeError
from jinja2.nodes import Concat
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE = 100_000  # items in one range() (jinja2's own sandbox limit)
MAX_LOOP_STEPS = 1_000_000  # range() items iterated in one rendering, all loops together
MAX_INT_BITS = int(4300 * math.log2(10))  # `**` results: Python's 4300-digit int/str limit
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")


class TemplateLimitError(TemplateRuntimeError):
    """A data template went over one of the limits above."""


def _raise_exception(message: str) -> None:
    """`raise_exception('...')` in a template (as in Hugging Face chat templates): stop with that message."""
    raise TemplateRuntimeError(message)


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple) else 0


class _Generator(CodeGenerator):
    """Compiles `a ~ b` to a call of the environment's bounded concatenation instead of jinja2's str_join."""

    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _CountedRange:
    """A range whose iteration counts against the rendering's MAX_LOOP_STEPS (still sized and indexable)."""

    def __init__(self, items: range, env: BoundedEnvironment):
        self._items, self._env = items, env  # "_": out of the sandbox's reach

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return _CountedRange(self._items[i], self._env) if isinstance(i, slice) else self._items[i]

    def __iter__(self):
        for item in self._items:
            self._env.step()
            yield item

    def __repr__(self) -> str:
        return repr(self._items)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with the limits of this module; `limit` is the most characters any value or output may hold."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limit: int):
        super().__init__(undefined=StrictUndefined, keep_trailing_newline=False)
        self.limit = limit
        self.steps = threading.local()
        self.globals.update(range=self._range, raise_exception=_raise_exception)

    def check_size(self, size: int, what: str) -> None:
        if size > self.limit:
            raise TemplateLimitError(f"{what} would hold {size:,} characters, over data.max_row_bytes={self.limit}")

    def _range(self, *args: int) -> _CountedRange:
        items = range(*args)
        if len(items) > MAX_RANGE:
            raise TemplateLimitError(f"range() of {len(items):,} items is over the limit of {MAX_RANGE:,}")
        return _CountedRange(items, self)

    def step(self) -> None:
        self.steps.n = getattr(self.steps, "n", 0) + 1
        if self.steps.n > MAX_LOOP_STEPS:
            raise TemplateLimitError(f"loops ran over {MAX_LOOP_STEPS:,} range() steps in one row")

    def concat(self, values: tuple) -> str:
        parts = [str(v) for v in values]
        self.check_size(sum(map(len, parts)), "a `~` concatenation")
        return "".join(parts)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            count = right if isinstance(left, str | list | tuple) else left
            if isinstance(count, int) and _length(left) + _length(right):
                self.check_size(_length(left) * count + _length(right) * count, "a `*` repetition")
        elif operator == "+":
            self.check_size(_length(left) + _length(right), "a `+` concatenation")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > MAX_INT_BITS:
                raise TemplateLimitError(f"{left} ** {right} is over 4300 digits")
        elif operator == "%" and isinstance(left, str):
            self._check_printf(left, right)
        result = super().call_binop(context, operator, left, right)
        self.check_size(_length(result), f"a `{operator}` result")
        return result

    def _check_printf(self, fmt: str, args: Any) -> None:
        numbers = [int(n) for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n and n != "*"]
        if "*" in "".join(m.group(0) for m in _PERCENT_SPEC.finditer(fmt)):
            numbers += [a for a in (args if isinstance(args, tuple) else (args,)) if isinstance(a, int)]
        for n in numbers:
            self.check_size(n, "a `%` width")

    def call(__self, __context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's signature)
        __self._check_arguments(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        __self.check_size(_length(result), "a call's result")
        return result

    def _check_arguments(self, obj: Any, args: tuple, kwargs: dict) -> None:
        if obj == self._range:  # range() has its own, clearer limit
            return
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and value > self.limit:
                raise TemplateLimitError(f"the argument {value:,} is over data.max_row_bytes={self.limit}")
        if getattr(obj, "__name__", "") in ("format", "format_map"):  # str.format, through the sandbox's wrapper
            template = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)
            if isinstance(template, str):
                for _, _, spec, _ in string.Formatter().parse(template):
                    for n in re.findall(r"\d+", spec or ""):
                        self.check_size(int(n), "a format width")

    def render(self, template: str, *args: Any, **kwargs: Any) -> str:
        """Render `template` with at most `limit` characters of output and MAX_LOOP_STEPS range() steps."""
        self.steps.n = 0
        out, size = [], 0
        for piece in self.from_string(template).generate(*args, **kwargs):
            size += len(piece)
            self.check_size(size, "the rendered text")
            out.append(piece)
        return "".join(out)


def _bounded_filter(env: BoundedEnvironment, name: str, func):
    def bounded(*args: Any, **kwargs: Any) -> Any:
        env._check_arguments(func, args, kwargs)
        if name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[-3:]):
            s, old, new = (str(a) for a in args[-3:])
            env.check_size(len(s) + s.count(old) * max(0, len(new) - len(old)) if old else len(s), "a replace")
        result = func(*args, **kwargs)
        env.check_size(_length(result), f"the `{name}` filter's result")
        return result

    if hasattr(func, "jinja_pass_arg"):  # jinja2's pass_context / pass_eval_context / pass_environment marker
        bounded.jinja_pass_arg = func.jinja_pass_arg
    return bounded


def environment(limit: int) -> BoundedEnvironment:
    """A bounded environment whose filters check their arguments and results too."""
    env = BoundedEnvironment(limit)
    env.filters = {name: _bounded_filter(env, name, f) for name, f in env.filters.items()}
    return env
