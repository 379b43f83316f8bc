"""The docs build's own rewriting (tools/docs.py): nbdev's links made relative to the site, source links to the site's copies
of the modules, repository links to pages, library warnings left out. The whole build and the browser check run in .ci/run."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location('docs', Path(__file__).resolve().parents[1]/'tools'/'docs.py')
docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs)

def test_links_are_made_relative_to_the_site():
    md = ("[source](/blob/main/fastai_hardmine/records.py#L21){target=\"_blank\" style=\"float:right\"} "
          "[`MiningRecords`](/records.html#miningrecords) [results](nbs/results.md) [r](results.md#goals) "
          "[tutorial](nbs/tutorial.ipynb) [diagnostics](nbs/19_diagnostics.ipynb) [other](/blob/main/setup.py#L1) "
          "[paper](https://arxiv.org/abs/1910.00762)")
    assert docs._fix_links(md, {'records'}) == (
        "[source](src/records.html#L-21) [`MiningRecords`](records.html#miningrecords) [results](results.html) "
        "[r](results.html#goals) [tutorial](tutorial.html) [diagnostics](diagnostics.html) "
        "[other](/blob/main/setup.py#L1) [paper](https://arxiv.org/abs/1910.00762)")

def test_only_library_warnings_are_left_out():
    warning = {'output_type': 'stream', 'name': 'stderr', 'text': [
        "/x/site-packages/torch/jit/_script.py:1491: FutureWarning: `torch.jit.script` is deprecated.\n", "  warnings.warn(\n"]}
    ours = {'output_type': 'stream', 'name': 'stderr', 'text': ["/work/nbs/x.py:3: UserWarning: yours\n"]}
    error = {'output_type': 'stream', 'name': 'stderr', 'text': ["Traceback (most recent call last):\n", "ValueError: no\n"]}
    assert docs._library_warning(warning)
    assert not any(docs._library_warning(o) for o in (ours, error, {'output_type': 'stream', 'name': 'stdout', 'text': ['x']}))
