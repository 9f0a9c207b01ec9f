"""The recipe-level guard: YAML that loads in bounded time and memory, into values a recipe can hold.

One place for the rules every recipe file and `key=value` override obeys (recipe.py calls `load_yaml`):
  - aliases: the document, with every alias expanded, has at most MAX_EXPANDED_NODES nodes, so a "billion
    laughs" file (9 levels of 9 aliases: 9**9 strings) is refused before anything walks it; recursive aliases
    (`&a [*a]`) are refused too;
  - nesting: at most MAX_DEPTH levels (PyYAML's composer is recursive: 100,000 `[` would raise RecursionError);
  - keys: the same key twice in one mapping is refused (YAML would keep only the last, silently);
  - numbers: an integer must fit in 64 bits, -2**63 to 2**64-1 (a 5,000-digit integer cannot even be converted
    by Python, and torch/numpy take no more).
Each breach is a MedtuneError naming the file (or the override) and, where known, the key and line.
"""

from __future__ import annotations

from typing import Any

import yaml

from medtune.errors import MedtuneError

MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 100
INT_BITS = 64
MAX_INT_DIGITS = 4300  # Python's int <-> str limit


class _TooLong:
    """A YAML integer too long for int(): kept as a marker until the key holding it is known."""

    def __init__(self, digits: int):
        self.digits = digits


class Refused(yaml.YAMLError):
    """YAML that parses but breaks a rule above (not a syntax error)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts expanded nodes, refuses duplicate keys and keeps over-long integers as markers."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                if key in seen and key != "<<":
                    raise Refused(f"the key '{key}' appears more than once in one mapping (line "
                                  f"{key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        digits = len(str(node.value).lstrip("+-").replace("_", ""))
        if digits > MAX_INT_DIGITS:
            return _TooLong(digits)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _check_expansion(root: yaml.Node) -> None:
    """Nodes of the document with aliases expanded (memoised: shared nodes are sized once), and its depth."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, children_done = stack.pop()
        if depth > MAX_DEPTH:
            raise Refused(f"lists/mappings nested more than {MAX_DEPTH} deep (line {node.start_mark.line + 1})")
        children = [] if isinstance(node, yaml.ScalarNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if children_done:
            active.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_EXPANDED_NODES:
                raise Refused(f"aliases expand to more than {MAX_EXPANDED_NODES:,} values (line "
                                     f"{node.start_mark.line + 1}): is this a YAML alias bomb?")
            continue
        if id(node) in sizes:
            continue
        if id(node) in active:
            raise Refused(f"a recursive alias (line {node.start_mark.line + 1})")
        active.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _check_values(tree: Any, source: str, prefix: str = "") -> None:
    """Integers within 64 bits, keyed by their dotted recipe key (the tree is at most MAX_DEPTH deep)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(tree, list) else f"{prefix}.{key}".lstrip(".")
        if isinstance(value, _TooLong):
            raise MedtuneError(f"an integer of {value.digits} digits does not fit in {INT_BITS} bits", file=source,
                               field=name)
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            raise MedtuneError(f"{value} does not fit in {INT_BITS} bits", file=source, field=name)
        _check_values(value, source, name)


def load_yaml(text: str, source: str, key: str | None = None, syntax_errors: bool = True) -> Any:
    """yaml.safe_load under the rules above. `key`: the dotted key of an override value (named in errors).
    syntax_errors=False: text that is not YAML at all comes back as the string it is (override values)."""
    try:
        tree = yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except RecursionError:
        raise MedtuneError(f"lists/mappings nested more than {MAX_DEPTH} deep", file=source, field=key) from None
    except Refused as e:
        raise MedtuneError(str(e), file=source, field=key) from None
    except yaml.YAMLError as e:
        if not syntax_errors:
            return text
        raise MedtuneError(f"not valid YAML: {str(e).splitlines()[0]}", file=source, field=key) from None
    _check_values({key: tree} if key else tree, source)
    return tree
