"""The README's usage examples run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_usage_examples_run():
    text = README.read_text()
    usage = text[text.index("## Usage"):text.index("## Speed")]
    blocks = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(blocks) == 5
    namespace = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["total"].count == 64 * 56 * 56
    assert namespace["dx"].shape == namespace["x"].shape
    assert namespace["dshortcut"].shape == namespace["x"].shape
    assert str(namespace["yb"].dtype) == "bfloat16" and namespace["mean"].dtype == "float32"
