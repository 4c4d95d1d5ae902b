"""ListOps (Long Range Arena): random nested list operations, their values, the TSV files, the tokens.

An expression is a tree: a leaf is a digit 0-9, a node applies an operator to 2..max_args children.

    MIN, MAX   the smallest / largest argument
    MED        the median, as LRA computes it: int(numpy.median(args)), so with an even count the mean
               of the two middle values rounded down (MED 3 8 = int(5.5) = 5)
    SM         the sum modulo 10

The sampling is LRA's: starting at depth 1, a node at a depth below max_depth is an operator with
probability 0.25 (else a uniform digit), an operator gets a uniform number of children in [2, max_args] and a
uniform operator; a tree is kept when min_length < length < max_length, where length counts the
tokens without brackets (operators, digits and one closing "]" per operator), and duplicates are
dropped. LRA's text wraps every argument in a pair of parentheses, left-nested:
MAX(2, 9) is "( ( ( [MAX 2 ) 9 ) ] )". Models see the tokens without parentheses: "[MAX 2 9 ]".

Sampling is seeded per chunk of CHUNK accepted examples (chunk i of seed s draws from
random.Random("listops/s/i")), so the examples depend on the seed and the bounds only, never on the
number of worker processes, and the first k of n examples are the same for any n >= k.
"""

import hashlib
import os
import random
import statistics
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from ..data import DataError

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = ("<pad>", "<cls>", *OPERATORS, *"0123456789", END)  # token id = index
PAD, CLS = 0, 1
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB) if i > CLS}  # the tokens a text may hold
NUM_CLASSES = 10
OPERATOR_P = 0.25
SPLITS = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
HEADER = "Source\tTarget"
CHUNK = 500

Tree = int | tuple[str, list]  # a digit, or (operator, children)


class ListOpsError(DataError):
    """A malformed expression or TSV file, or impossible bounds; the message says where."""


class TooLong(Exception):
    """Raised inside sample_tree once a tree reaches max_length tokens: it would be rejected anyway."""


def apply(operator: str, args: list[int]) -> int:
    if operator == "[MIN":
        return min(args)
    if operator == "[MAX":
        return max(args)
    if operator == "[MED":
        return int(statistics.median(args))  # = int(np.median(args)): the mean of the middle two, rounded down
    if operator == "[SM":
        return sum(args) % 10
    raise ListOpsError(f"unknown operator {operator!r}")


def sample_tree(rng: random.Random, max_depth: int, max_args: int, max_length: int) -> tuple[Tree, int] | None:
    """One tree and its length in tokens, or None if it reaches max_length tokens (stopped early)."""
    length = 0
    uniform = rng.random  # int(uniform() * k) is uniform on 0..k-1, and 3x faster than rng.randrange(k)

    def node(depth: int) -> Tree:
        nonlocal length
        if depth < max_depth and uniform() < OPERATOR_P:
            length += 2  # the operator and its "]"
            children = [node(depth + 1) for _ in range(2 + int(uniform() * (max_args - 1)))]
            return OPERATORS[int(uniform() * len(OPERATORS))], children
        length += 1
        if length >= max_length:
            raise TooLong
        return int(uniform() * 10)

    try:
        tree = node(1)
    except TooLong:
        return None
    return (tree, length) if length < max_length else None


def value(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    operator, children = tree
    return apply(operator, [value(child) for child in children])


def to_text(tree: Tree) -> str:
    """LRA's text: ( ( ( [MAX 2 ) 9 ) ] ) for MAX(2, 9)."""
    if isinstance(tree, int):
        return str(tree)
    operator, children = tree
    args = " ".join(f"{to_text(child)} )" for child in children)
    return f"{'( ' * (len(children) + 1)}{operator} {args} ] )"


def tokens(text: str) -> list[str]:
    """The tokens a model sees: the text without its parentheses."""
    return text.replace("(", " ").replace(")", " ").split()


def parse(text: str) -> Tree:
    """The tree of an expression, with or without LRA's parentheses (which carry no information)."""
    stack: list[tuple[str, list]] = []
    result = None
    for i, token in enumerate(tokens(text)):
        if result is not None:
            raise ListOpsError(f"{text[:60]!r}: tokens after the end of the expression (token {i}: {token!r})")
        if token in OPERATORS:
            stack.append((token, []))
            continue
        if token == END:
            if not stack:
                raise ListOpsError(f"{text[:60]!r}: ']' without an operator (token {i})")
            operator, children = stack.pop()
            if len(children) < 1:
                raise ListOpsError(f"{text[:60]!r}: {operator} without arguments (token {i})")
            node = (operator, children)
        elif len(token) == 1 and "0" <= token <= "9":
            node = int(token)
        else:
            raise ListOpsError(f"{text[:60]!r}: unknown token {token!r} (token {i})")
        if stack:
            stack[-1][1].append(node)
        else:
            result = node
    if stack or result is None:
        raise ListOpsError(f"{text[:60]!r}: incomplete expression ({len(stack)} operator(s) not closed)")
    return result


def evaluate(text: str) -> int:
    """The label of an expression: its value, a digit 0-9."""
    return value(parse(text))


def encode(text: str, cls: bool = False) -> list[int]:
    """Token ids of an expression, with a leading <cls> if asked."""
    try:
        ids = list(map(TOKEN_IDS.__getitem__, tokens(text)))
    except KeyError as e:
        raise ListOpsError(f"{text[:60]!r}: unknown token {e.args[0]!r}") from None
    return [CLS, *ids] if cls else ids


@dataclass(frozen=True)
class Bounds:
    """LRA's: depth at most 10, at most 10 arguments, 500 < length < 2000 tokens."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    def check(self) -> None:
        if self.max_depth < 1 or self.max_args < 2:
            raise ListOpsError(f"max_depth must be >= 1 and max_args >= 2, got {self.max_depth} and {self.max_args}")
        longest = 1
        for _ in range(self.max_depth - 1):
            longest = 2 + self.max_args * longest  # every node above max_depth an operator with max_args children
        if self.max_length - self.min_length < 2 or longest <= self.min_length:
            raise ListOpsError(
                f"no tree has min_length < length < max_length with {self} (longest possible: {longest} tokens)"
            )


def sample_chunk(seed: int, bounds: Bounds, index: int) -> list[tuple[str, int]]:
    """CHUNK accepted examples (text, label) of chunk `index`: a fixed function of its arguments."""
    rng = random.Random(f"listops/{seed}/{index}")
    out = []
    while len(out) < CHUNK:
        drawn = sample_tree(rng, bounds.max_depth, bounds.max_args, bounds.max_length)
        if drawn is not None and drawn[1] > bounds.min_length:
            out.append((to_text(drawn[0]), value(drawn[0])))
    return out


def generate(
    n: int, seed: int = 0, bounds: Bounds = Bounds(), *, workers: int = 1, progress: bool = False
) -> Iterator[tuple[str, int]]:
    """n distinct examples (text, label), in a fixed order for the seed and bounds."""
    bounds.check()
    draw = partial(sample_chunk, seed, bounds)
    seen: set[bytes] = set()  # 128-bit digests of the texts, not the texts (~7 kB each)
    produced, next_chunk = 0, 0
    bar = tqdm(total=n, desc="generating", unit="ex", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        while produced < n:
            wanted = -(-(n - produced) // CHUNK)  # chunks, if no duplicate came up
            indices = range(next_chunk, next_chunk + max(wanted, workers))
            next_chunk = indices.stop
            for chunk in pool.map(draw, indices) if pool else map(draw, indices):
                for text, label in chunk:
                    key = hashlib.blake2b(text.encode(), digest_size=16).digest()
                    if key in seen or produced == n:
                        continue
                    seen.add(key)
                    produced += 1
                    bar.update()
                    yield text, label
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()


def write_splits(
    out_dir: Path,
    counts: dict[str, int],
    seed: int = 0,
    bounds: Bounds = Bounds(),
    *,
    workers: int = 1,
    progress: bool = False,
) -> None:
    """basic_{train,val,test}.tsv with `counts` examples each, in that order from one stream, each atomically."""
    bounds.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = generate(sum(counts.values()), seed, bounds, workers=workers, progress=progress)
    try:
        for split, count in counts.items():
            path = out_dir / SPLITS[split]
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            try:
                with open(tmp, "w", newline="\n") as f:
                    f.write(HEADER + "\n")
                    f.writelines(f"{text}\t{label}\n" for _, (text, label) in zip(range(count), stream))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    finally:
        stream.close()


def read_split(path: Path) -> Iterator[tuple[str, int]]:
    """(text, label) rows of an LRA ListOps TSV file (header Source<TAB>Target)."""
    with open(path, newline="") as f:
        header = f.readline().rstrip("\r\n")
        if header != HEADER:
            raise ListOpsError(f"{path}: first line must be the header {HEADER!r}, got {header[:60]!r}")
        for number, line in enumerate(f, 2):
            text, tab, label = line.rstrip("\r\n").rpartition("\t")
            if not tab or not label.isdigit() or not 0 <= int(label) < NUM_CLASSES:
                raise ListOpsError(f"{path}:{number}: expected 'expression<TAB>digit', got {line[:60]!r}")
            yield text, int(label)
