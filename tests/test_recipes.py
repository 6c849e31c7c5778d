"""docs/recipes.md: every ```python block of the page runs as printed, on the
active backend (tests/run_backends.py runs this file under each of them).

Each block checks its own claim with `assert`s (moving statistics frozen,
one pooled update per accumulation round, bias-corrected averages against a
NumPy computation, ...), so a block that runs but shows the wrong behaviour
fails here too."""

import pathlib
import re
import unicodedata

import pytest

PAGE = pathlib.Path(__file__).parent.parent / "docs" / "recipes.md"


def _slug(heading: str) -> str:
    """The heading's anchor, as Python-Markdown's `toc` extension makes it."""
    text = unicodedata.normalize("NFKD", heading.replace("`", ""))
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _blocks() -> list[tuple[str, str]]:
    """`(id, code)` for every ```python block, id from the heading above it;
    the code is padded with blank lines so that tracebacks give the page's
    line numbers."""
    blocks, heading, seen = [], "page", {}
    text = PAGE.read_text()
    for match in re.finditer(r"^(#{1,6}) ([^\n]+)$|^```python\n(.*?)^```$", text,
                             re.M | re.S):
        if match.group(2) is not None:
            heading = _slug(match.group(2))
            continue
        seen[heading] = seen.get(heading, 0) + 1
        name = heading if seen[heading] == 1 else f"{heading}-{seen[heading]}"
        padding = "\n" * (text.count("\n", 0, match.start(3)))
        blocks.append((name, padding + match.group(3)))
    return blocks


BLOCKS = _blocks()


def test_page_has_one_example_per_recipe():
    assert [name for name, _ in BLOCKS] == [
        "fine-tuning-with-frozen-statistics",
        "test-time-adaptation",
        "gradient-accumulation",
        "averaged-weights-ema-swa-schedule-free",
        "warm-up-without-bias",
        "replicas-that-agree",
    ]
    for name, code in BLOCKS:
        assert re.search(r"\bassert\b|np\.testing\.assert", code), name


@pytest.mark.parametrize("code", [code for _, code in BLOCKS],
                         ids=[name for name, _ in BLOCKS])
def test_example_runs_and_checks_itself(code):
    exec(compile(code, str(PAGE), "exec"), {"__name__": "__recipe__"})
