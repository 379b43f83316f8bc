"""Build the documentation site from the notebooks, and check it in a headless browser.

    python tools/docs.py build     # the site, in _docs/ (open _docs/index.html); --verbose prints nbdev's warnings
    python tools/docs.py check     # every page in headless Chromium: pages load, links resolve, images load,
                                   # no traceback; screenshots in _docs_check/
    python tools/docs.py serve     # build, then serve _docs/ on http://localhost:8000
    python tools/docs.py run NB    # run a notebook and save the outputs its page shows (plots, tables), for the pages
                                   # whose examples are too slow to run at each build (nbs/03_diagnostics.ipynb)

The build starts from nbdev's own processing of the notebooks (`nbdev.serve.proc_nbs`: hidden cells dropped, `show_doc`
rendered, cross-links made), as `nbdev-docs` does before Quarto renders. Quarto cannot be installed from the package
registries this project reaches, so the processed notebooks are rendered with MkDocs, Material for MkDocs and
mkdocs-jupyter instead, which install with pip (`pip install -e ".[docs]"`): they give navigation across pages, search,
the API reference as `show_doc` wrote it, and plots as images, with no Quarto and no network. A user who has Quarto can
still run `nbdev-docs`: the nbdev settings in pyproject.toml are the usual ones.

What the build adds to nbdev's output: each page is named after its module (`records.html`), as nbdev names it;
cross-links are made relative to the site; each `show_doc` source link points to a highlighted copy of the module in
the site (`src/records.html#L-21`, `src/bench.data.html#L-12` for a subpackage's module), since the package has no public
repository to link to; the navigation groups the pages by the number their notebook's file name starts with: "Using it"
(the home page, the tutorial, notebooks 00-09, the results), "How it works" (10-29, and 99_all) and "Benchmark" (30-39).
Each page opens with its notebook's title and its `> summary` line (nbdev moves both into the front matter, which only
Quarto reads). A `show_doc` that repeats the parameters of one shown earlier on its page (a rule's `@delegates` to
`HardMiningCallback`) shows its own and links to the other for the rest; nbdev's second `show_doc` of a patched method that
already has one (nbdev adds one after every exported cell, missing `show_doc(Learner.x)`) is left out. Code blocks wrap their
long lines and inline code in tables keeps its words whole (`EXTRA_CSS`); `check` fails a page where either does not hold.
nbdev's warnings while it processes the notebooks are counted on one line and listed in _proc/docs_warnings.txt.
"""
from __future__ import annotations
import argparse, functools, http.server, itertools, json, os, re, shutil, subprocess, sys, threading, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE, STAGE, SHOTS = ROOT/'_docs', ROOT/'_proc'/'_site_src', ROOT/'_docs_check'
WARNINGS, THEME = ROOT/'_proc'/'docs_warnings.txt', ROOT/'_proc'/'_site_theme'

# the navigation's sections, from the number a notebook's file name starts with: 00-09 is what a user calls (with the home
# page, the tutorial and the results), 30-39 the benchmark (`bench.*`), any other number how the package works (10-29,
# and 99_all, the one import)
USING, INSIDE, BENCHMARK = 'Using it', 'How it works', 'Benchmark'
SECTIONS = (USING, INSIDE, BENCHMARK)


def nav_section(file_name:str) -> str:
    "The navigation section of a page's source file, from its number alone (`02_prune.ipynb` -> 'Using it'); unnumbered: 'Using it'"
    m = re.match(r'(\d+)_', file_name)
    if m is None: return USING
    n = int(m.group(1))
    return USING if n <= 9 else BENCHMARK if 30 <= n <= 39 else INSIDE


def _reading_order(file_name:str) -> tuple:
    "Home page first, then other unnumbered notebooks (the tutorial), numbered ones by number, then markdown pages (results)"
    m = re.match(r'(\d+)_', file_name)
    if file_name.endswith('.md'): return (3, file_name)
    if Path(file_name).stem == 'index': return (0, file_name)
    return (2, int(m.group(1)), file_name) if m else (1, file_name)


def nav_groups(file_names:list[str]) -> list[tuple[str, list[str]]]:
    "The navigation: each section that has pages, with its source files in reading order (`index.ipynb`, `01_callback.ipynb`, ...)"
    ordered = sorted(file_names, key=_reading_order)
    groups = [(section, [f for f in ordered if nav_section(f) == section]) for section in SECTIONS]
    return [(section, files) for section, files in groups if files]


def module_name(path:Path) -> str:
    "A module's dotted name inside the package, from its path there (`bench/data.py` -> 'bench.data', `bench/__init__.py` -> 'bench')"
    parts = list(path.with_suffix('').parts)
    if parts[-1] == '__init__': parts.pop()
    return '.'.join(parts)


def _package_modules(package:Path) -> list[Path]:
    "The package's modules, subpackages' included, as nbdev writes them: no private module, no `__init__.py` nbdev did not write"
    def documented(p:Path) -> bool:
        rel = p.relative_to(package)
        if any(part.startswith('_') for part in rel.parts[:-1]) or (p.name.startswith('_') and p.name != '__init__.py'): return False
        # the package's own `__init__.py` holds the version only; a subpackage's may be a notebook's module
        return p.name != '__init__.py' or (len(rel.parts) > 1 and 'AUTOGENERATED' in p.read_text()[:500])
    return sorted(p for p in package.rglob('*.py') if documented(p))


def _title(nb:dict, fallback:str) -> str:
    for c in nb['cells']:
        src = ''.join(c['source'])
        m = re.search(r'^title:\s*(.+)$', src, re.M) if c['cell_type'] == 'raw' else re.match(r'#\s+(.+)', src)
        if m: return m.group(1).strip().strip("'\"")
    return fallback


def _page_name(nb:dict, path:Path) -> str:
    "The page's name, as nbdev names it: the `output-file` of its front matter (records.html -> records)"
    for c in nb['cells']:
        if c['cell_type'] == 'raw':
            m = re.search(r'^output-file:\s*(\S+)\.html$', ''.join(c['source']), re.M)
            if m: return m.group(1)
    return re.sub(r'^\d+_', '', path.stem)


def _fix_links(text:str, modules:set[str]) -> str:
    "nbdev's root-relative links, made relative to the site; source links, to the highlighted copies of the modules"
    def src(m):
        mod = module_name(Path(m.group(1) + '.py'))
        return f"](src/{mod}.html#L-{m.group(2)})" if mod in modules else m.group(0)
    text = re.sub(r'\]\(/blob/[^/)]+/fastai_hardmine/((?:\w+/)*\w+)\.py#L(\d+)\)', src, text)
    text = re.sub(r'\]\(/([\w.-]+\.html(?:#[^)]*)?)\)', r'](\1)', text)
    # links between repository files (the README's to nbs/results.md) become links between pages
    text = re.sub(r'\]\((?:nbs/)?([\w-]+)\.md(#[^)]*)?\)', r'](\1.html\2)', text)
    text = re.sub(r'\]\(nbs/(?:\d+_)?(\w[\w.]*)\.ipynb\)', r'](\1.html)', text)
    # Quarto's attribute syntax after a link (`{target="_blank" ...}`) means nothing to other renderers
    return re.sub(r'\)\{[^}\n]*\}', ')', text)


def _library_warning(output:dict) -> bool:
    "A stderr output that only holds warnings raised inside installed libraries (torch's deprecations at import, ...)"
    if output.get('output_type') != 'stream' or output.get('name') != 'stderr': return False
    # each warning: `file:line: Category: message`, the message's further lines, then the source line, indented
    records = re.split(r'(?m)^(?=\S+:\d+: \w*Warning: )', ''.join(output['text']))
    if records[0].strip() or len(records) < 2: return False
    def library(record):
        lines = record.rstrip('\n').splitlines()
        after_source = list(itertools.dropwhile(lambda l: not l.startswith(' '), lines))
        return re.match(r'\S*/site-packages/\S+:\d+: ', lines[0]) and all(l.startswith(' ') or not l.strip() for l in after_source)
    return all(library(r) for r in records[1:])


def front_matter(nb:dict) -> dict:
    "The notebook's front matter, which nbdev makes from its `# Title` and `> summary` cell (`title`, `description`, ...)"
    import yaml
    for c in nb['cells']:
        if c['cell_type'] == 'raw':
            m = re.match(r'\s*---\n(.*?)\n---', ''.join(c['source']), re.S)
            if m: return yaml.safe_load(m.group(1)) or {}
    return {}


def _heading_cell(meta:dict) -> dict|None:
    "The page's title and summary line, as the notebook wrote them before nbdev moved them into the front matter"
    if not meta.get('title'): return None
    text = f"# {meta['title']}" + (f"\n\n> {' '.join(str(meta['description']).split())}" if meta.get('description') else '')
    return {'cell_type': 'markdown', 'metadata': {}, 'source': text.splitlines(keepends=True)}


def _show_doc_name(cell:dict) -> str|None:
    "The object a `show_doc` cell documents (`Learner.top_k`), or None"
    m = re.search(r'^show_doc\(([\w.]+)\)', ''.join(cell.get('source', [])), re.M)
    return m.group(1) if m and cell['cell_type'] == 'code' else None


def drop_repeated_show_docs(cells:list[dict]) -> list[dict]:
    "The cells, less each `show_doc` nbdev added (`has_sd`) for an object a `show_doc` of the notebook's own documents"
    own = {_show_doc_name(c) for c in cells if not c.get('has_sd')} - {None}
    kept = [c for c in cells if not (c.get('has_sd') and _show_doc_name(c) in own)]
    for c in kept: c.pop('has_sd', None)   # not a key of nbformat's cells
    return kept


# a `show_doc` signature as nbdev 3 writes it: one parameter a line, each with its docment
_SIGNATURE = re.compile(r'^### (?P<name>\S+)\n\n```python\ndef \w+\(\n(?P<params>(?:    .*\n)+)\)', re.M)
# repeating this many parameters, the same name, type, default and docment, is repeating another's signature
MIN_SHARED = 3


def _params(block:str) -> list[str]:
    return [l for l in block.splitlines() if l.strip() not in ('*,', '/,')]


def _anchor(name:str) -> str: return re.sub(r'[^\w-]', '', name.lower())


def share_parameters(docs:list[str]) -> list[str]:
    """The `show_doc` markdowns of one page, in order, each that repeats at least `MIN_SHARED` parameters of the first one
    before it that it repeats (a `@delegates` to a base class) showing only its own, its `**kwargs` linked to that one"""
    seen, out = [], []   # (name, parameter lines) of the signatures shown in full
    for doc in docs:
        m = _SIGNATURE.search(doc)
        if not m: out.append(doc); continue
        params = m.group('params')
        base = next(((name, lines) for name, lines in seen if len(set(_params(params)) & set(lines)) >= MIN_SHARED), None)
        if base is None:
            seen.append((m.group('name'), _params(params))); out.append(doc); continue
        name, lines = base
        own = [l for l in params.splitlines() if l not in lines]
        if own and own[-1].strip() == '*,': own.pop()   # `*, **kwargs` is not Python
        shared = [re.match(r'\s*(\w+)', l).group(1) for l in params.splitlines() if l in lines]
        sig = ''.join(l + '\n' for l in own) + f"    **kwargs, # {name}'s parameters\n"
        note = (f"\n\n`**kwargs`: the parameters of [`{name}`](#{_anchor(name)}), with its defaults: "
                + ', '.join(f'`{p}`' for p in shared) + '.')
        out.append(doc[:m.start('params')] + sig + doc[m.end('params'):].rstrip('\n') + note + '\n')
    return out


def _stage_notebook(src:Path, dst:Path, modules:set[str]):
    """A processed notebook, made ready for mkdocs-jupyter: the title and summary as a first cell instead of the front
    matter, no `#|` lines, `echo: false` inputs hidden, each object's `show_doc` once, shared parameters shown once"""
    nb = json.loads(src.read_text())
    head = _heading_cell(front_matter(nb))
    cells = [head] if head else []
    for c in drop_repeated_show_docs(nb['cells']):
        if c['cell_type'] == 'raw': continue
        # nbdev's execution timings (numbers where nbformat's schema wants strings)
        c.get('metadata', {}).pop('execution', None)
        lines = ''.join(c['source']).splitlines(keepends=True)
        if c['cell_type'] == 'code':
            directives = ''.join(l for l in lines if l.startswith('#|'))
            lines = [l for l in lines if not l.startswith('#|')]
            if 'echo: false' in directives: c.setdefault('metadata', {}).setdefault('tags', []).append('remove_input')
            c['outputs'] = [o for o in c.get('outputs', []) if not _library_warning(o)]
            for o in c['outputs']:
                if 'text/markdown' in o.get('data', {}):
                    o['data']['text/markdown'] = _fix_links(''.join(o['data']['text/markdown']), modules)
                # a `show_doc` output also carries its repr as text/plain: the markdown is what is shown
                if 'text/markdown' in o.get('data', {}): o['data'].pop('text/plain', None)
        else: lines = _fix_links(''.join(lines), modules).splitlines(keepends=True)
        if c['cell_type'] == 'markdown' and ''.join(lines).strip().startswith('<!-- WARNING'): continue
        c['source'] = lines
        cells.append(c)
    shown = [o['data'] for c in cells for o in c.get('outputs', []) if 'text/markdown' in o.get('data', {})]
    for data, doc in zip(shown, share_parameters([data['text/markdown'] for data in shown])): data['text/markdown'] = doc
    nb['cells'] = cells
    dst.write_text(json.dumps(nb))


def _source_pages(modules:list[Path], package:Path, out:Path):
    "Each module of the package as a highlighted page with an anchor per line (`#L-21`), named by its module (`bench.data.html`)"
    from pygments import highlight
    from pygments.lexers import PythonLexer
    from pygments.formatters import HtmlFormatter
    out.mkdir(parents=True, exist_ok=True)
    fmt = HtmlFormatter(linenos='table', lineanchors='L', anchorlinenos=True, full=True, title='')
    for m in modules:
        rel = m.relative_to(package)
        fmt.title = f'fastai_hardmine/{rel.as_posix()}'
        (out/f'{module_name(rel)}.html').write_text(highlight(m.read_text(), PythonLexer(), fmt))


# the site's own CSS, after Material's and mkdocs-jupyter's
EXTRA_CSS = """\
/* notebook prompts (`In [ ]:`, `Out[4]:`) mean nothing on a documentation page */
.jupyter-wrapper .jp-InputPrompt, .jupyter-wrapper .jp-OutputPrompt { display: none !important; }
.md-grid { max-width: 1400px; }
/* code blocks wrap long lines instead of scrolling: a `<pre>` is `white-space: pre` unless told otherwise, and
   mkdocs-jupyter's `.highlight pre` (markdown and input cells) is not; only a word longer than a line breaks inside */
.md-typeset pre, .md-typeset pre > code, .jupyter-wrapper .highlight pre, .jupyter-wrapper .jp-RenderedText pre,
.jupyter-wrapper .jp-OutputArea-output pre {
  white-space: pre-wrap !important; word-break: normal !important; overflow-wrap: anywhere !important;
}
/* inline code in a table keeps its words whole: Material's `.md-typeset code { word-break: break-word }` lets a narrow
   column cut an identifier anywhere (`batch_loss_fi|lter`); the line wraps between words, and a table wider than the
   page scrolls (Material's `table:not([class])` has `overflow: auto`) */
.md-typeset td code, .md-typeset th code { word-break: normal; overflow-wrap: normal; }
"""

# what `check` measures on each page: code blocks wider than their box (a horizontal scrollbar), and inline code in a
# table cut inside a word (laid out on more than one line with no space to break at)
LAYOUT_JS = """
const pres = [...document.querySelectorAll('article pre')].filter(p => p.scrollWidth > p.clientWidth + 1);
const codes = [...document.querySelectorAll('article td code, article th code')]
  .filter(c => !/\\s/.test(c.textContent) && c.getClientRects().length > 1);
return [pres.map(p => p.textContent.slice(0, 100)), codes.map(c => c.textContent)];
"""


# Material's page title, less "fastai_hardmine - fastai_hardmine" on the home page (titled as the site, and no "homepage"
# to Material, which counts only a page outside the navigation's sections)
MAIN_HTML = """{% extends "base.html" %}
{% block htmltitle %}
  {% if page.title == config.site_name %}<title>{{ config.site_name }}</title>{% else %}{{ super() }}{% endif %}
{% endblock %}
"""


def site_assets(stage:Path, theme:Path):
    "The site's CSS in the staged pages, and its template override in `theme`"
    (stage/'extra.css').write_text(EXTRA_CSS)
    shutil.rmtree(theme, ignore_errors=True); theme.mkdir(parents=True)
    (theme/'main.html').write_text(MAIN_HTML)


def _mkdocs_yml(sections:list[tuple[str, list[tuple[str, str]]]], docs_dir:str=STAGE.name, site_dir:str=f'../{SITE.name}',
                theme_dir:str=THEME.name) -> str:
    """MkDocs' settings, with the navigation in `sections`: (section, [(title in the menu, page file)]); the folders are
    relative to the settings file"""
    nav = '\n'.join(f"  - {json.dumps(section)}:\n" + '\n'.join(f"    - {json.dumps(title)}: {page}" for title, page in pages)
                     for section, pages in sections)
    return f"""site_name: fastai_hardmine
site_description: Hard-example mining for fastai
docs_dir: {docs_dir}
site_dir: {site_dir}
use_directory_urls: false
theme:
  name: material
  custom_dir: {theme_dir}
  font: false
  features: [navigation.sections, content.code.copy]
nav:
{nav}
plugins:
  - search
  - mkdocs-jupyter:
      execute: false
      include_source: true
      ignore_h1_titles: false
      remove_tag_config:
        remove_input_tags: [remove_input]
extra_css: [extra.css]
markdown_extensions: [tables, admonition, toc]
"""


# nbdev's warning for a cell that mixes imports with other code: nbdev runs such a cell whole to render the `show_doc`s
# (its test code included), where a cell of imports alone is all it needs (nbdev's FAQ)
MIXED_CELL = 'Found cells containing imports and other code'


def _warned_cell(message:str, notebooks:list[Path]) -> str:
    "Which notebook holds the cell a warning quotes (`02_prune.ipynb`), from the cell's source in the message"
    m = re.search(r'\n---\n(.*)\n---\n', message, re.S)
    if m:
        strip = lambda s: '\n'.join(l for l in s.strip().splitlines() if not l.startswith('#|')).strip()
        quoted = strip(m.group(1))
        for nb in notebooks:
            if any(strip(''.join(c['source'])) == quoted for c in json.loads(nb.read_text())['cells']): return nb.name
    return '?'


def summarize_warnings(caught:list[str], notebooks:list[Path]) -> str:
    "One line for nbdev's warnings: how many, of which kind, in which notebooks"
    if not caught: return "docs: nbdev's processing gave no warning"
    mixed = [_warned_cell(w, notebooks) for w in caught if MIXED_CELL in w]
    per_nb = {nb: mixed.count(nb) for nb in sorted(set(mixed))}
    kinds = [f"{len(mixed)} for cells that mix imports with other code (put the imports in a cell of their own): "
             + ', '.join(f'{nb} ({n})' for nb, n in per_nb.items())] if mixed else []
    if len(caught) > len(mixed): kinds.append(f"{len(caught) - len(mixed)} other")
    return f"docs: {len(caught)} nbdev warning(s), {'; '.join(kinds)}; all in {WARNINGS.relative_to(ROOT)} (--verbose prints them)"


def _process_notebooks(verbose:bool=False):
    """nbdev's processing of the notebooks into _proc/, its own warnings counted on one line and listed in a file (printed
    with `verbose`); warnings raised in the cells it runs stay in their cells' outputs, errors stop the build"""
    from nbdev.serve import proc_nbs
    caught, show = [], warnings.showwarning
    def record(message, category, filename, lineno, file=None, line=None):
        if f'{os.sep}nbdev{os.sep}' in filename: caught.append(f"{filename}:{lineno}: {category.__name__}: {message}")
        else: show(message, category, filename, lineno, file, line)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('always')   # each cell's warning, not the first one of its kind only
            warnings.showwarning = record
            proc_nbs(n_workers=0, force=True)
    finally:
        WARNINGS.parent.mkdir(exist_ok=True)
        WARNINGS.write_text(''.join(w.rstrip('\n') + '\n\n' for w in caught))
        if verbose: print(WARNINGS.read_text(), end='')
        print(summarize_warnings(caught, sorted((ROOT/'nbs').glob('*.ipynb'))))


def build(verbose:bool=False):
    "Process the notebooks with nbdev, stage them for MkDocs, render the site into _docs/"
    _process_notebooks(verbose)
    proc = ROOT/'_proc'
    shutil.rmtree(STAGE, ignore_errors=True); shutil.rmtree(SITE, ignore_errors=True)
    STAGE.mkdir(parents=True)
    package = ROOT/'fastai_hardmine'
    modules = _package_modules(package)
    names = {module_name(m.relative_to(package)) for m in modules}
    # each source file (the notebook's, which holds its number) -> (title in the menu, page file, named by its module)
    pages = {}
    for nb_path in sorted(proc.glob('*.ipynb')):
        nb = json.loads(nb_path.read_text())
        name = 'index' if nb_path.stem == 'index' else _page_name(nb, nb_path)
        _stage_notebook(nb_path, STAGE/f'{name}.ipynb', names)
        pages[nb_path.name] = (_title(nb, name), f'{name}.ipynb')
    results = proc/'results.md'
    if results.exists():
        text = re.sub(r'\A---\n.*?\n---\n', '', results.read_text(), flags=re.S)
        (STAGE/'results.md').write_text('# Benchmark results\n\n' + _fix_links(text, names))
        shutil.copytree(proc/'results', STAGE/'results', ignore=shutil.ignore_patterns('*.npz', '*.json'))
        pages['results.md'] = ('Benchmark results', 'results.md')
    for extra in ('images',):
        if (proc/extra).exists(): shutil.copytree(proc/extra, STAGE/extra)
    _source_pages(modules, package, STAGE/'src')
    site_assets(STAGE, THEME)
    sections = [(section, [pages[f] for f in files]) for section, files in nav_groups(list(pages))]
    # the MkDocs settings are made here, next to the staged pages, from the notebooks found
    (proc/'mkdocs.yml').write_text(_mkdocs_yml(sections))
    mkdocs_build(proc/'mkdocs.yml')
    print(f"docs: {len(pages)} pages and {len(modules)} source pages in {SITE.relative_to(ROOT)}/ "
          f"(open {SITE.relative_to(ROOT)}/index.html)")


def mkdocs_build(settings:Path):
    subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--quiet', '-f', str(settings)], cwd=ROOT, check=True,
                   env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def _serve(port:int=0, site:Path=SITE) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(('127.0.0.1', port), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    if not (chromium and driver):
        raise SystemExit("docs check: needs headless Chromium and its driver (Debian: apt-get install -y chromium "
                         "chromium-driver); .ci/run installs them when missing")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1280,1000', '--disable-dev-shm-usage'):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


# what an error cell or a failed page shows: a Python traceback, or an exception line as a notebook prints it
ERRORS = re.compile(r'Traceback \(most recent call last\)|^\w+(Error|Exception): ', re.M)


def check():
    """Open every page in headless Chromium: each loads, its internal links resolve, its images load, no error shows, no
    code block scrolls sideways and no inline code in a table is cut inside a word (at the browser's 1280 px width)"""
    if not (SITE/'index.html').exists(): raise SystemExit("docs check: no site in _docs/: run `python tools/docs.py build`")
    server = _serve()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    pages = sorted(p.relative_to(SITE).as_posix() for p in SITE.glob('*.html') if p.name != '404.html')
    browser, problems = _browser(), []
    shutil.rmtree(SHOTS, ignore_errors=True); SHOTS.mkdir()
    try:
        for page in pages:
            browser.get(base + page)
            title = browser.title
            if not title or '404' in title: problems.append(f"{page}: did not load (title {title!r})")
            text = browser.find_element('tag name', 'article').text if browser.find_elements('tag name', 'article') else ''
            if not text.strip(): problems.append(f"{page}: no content")
            m = ERRORS.search(text)
            if m: problems.append(f"{page}: shows an error: {text[max(0, m.start() - 80):m.end() + 120]!r}")
            errs = browser.find_elements('css selector', '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')
            if errs: problems.append(f"{page}: {len(errs)} cell(s) print to stderr: {errs[0].text[:200]!r}")
            broken = browser.execute_script(
                "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
            problems += [f"{page}: image does not load: {src[:120]}" for src in broken]
            scrolling, cut = browser.execute_script(LAYOUT_JS)
            problems += [f"{page}: code block needs a horizontal scrollbar: {text!r}" for text in scrolling]
            problems += [f"{page}: inline code in a table cut inside a word: {text!r}" for text in cut]
            links = browser.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
            for href in links:
                # the project has no public repository or hosted site yet: a link there leads nowhere
                if re.match(r'https?://([\w-]+\.)?(github\.com/fastai-hardmine|fastai-hardmine\.github\.io)', href):
                    problems.append(f"{page}: link to a place that does not exist: {href}")
                if not href.startswith(base): continue
                target = href[len(base):].split('#')[0].split('?')[0]
                if target and not (SITE/target).exists(): problems.append(f"{page}: link to a missing page: {target}")
            if page in ('index.html', 'callback.html', 'diagnostics.html'):
                browser.save_screenshot(str(SHOTS/page.replace('.html', '.png')))
    finally:
        browser.quit(); server.shutdown()
    for p in problems: print('docs check:', p)
    print(f"docs check: {len(pages)} pages opened in headless Chromium, {len(problems)} problem(s); "
          f"screenshots in {SHOTS.relative_to(ROOT)}/")
    if problems: raise SystemExit(1)


def run(nb_path:str):
    "Run the notebook in its folder and save its outputs, less printed text (progress, warnings) and execution counts"
    nb_path = Path(nb_path).resolve()
    out = ROOT/'_proc'/f'run_{nb_path.name}'
    out.parent.mkdir(exist_ok=True)
    subprocess.run([sys.executable, '-c', 'import sys; from execnb.shell import exec_nb; exec_nb(sys.argv[1], sys.argv[2])',
                    nb_path.name, str(out)], cwd=nb_path.parent, check=True)
    nb = json.loads(out.read_text())
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        c['outputs'] = [o for o in c.get('outputs', []) if o.get('output_type') != 'stream']
        for o in c['outputs']:
            if 'execution_count' in o: o['execution_count'] = None
        c['execution_count'] = None
        c.get('metadata', {}).pop('execution', None)
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    print(f"ran {nb_path.relative_to(ROOT)}: outputs saved")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('command', choices=('build', 'check', 'serve', 'run'))
    p.add_argument('notebook', nargs='?', help="the notebook to run (command 'run')")
    p.add_argument('-v', '--verbose', action='store_true', help="build: print nbdev's warnings, not only their count")
    args = p.parse_args()
    if args.command == 'run':
        if not args.notebook: p.error("run: which notebook? e.g. python tools/docs.py run nbs/03_diagnostics.ipynb")
        run(args.notebook)
    elif args.command == 'build': build(args.verbose)
    elif args.command == 'check': check()
    else:
        build(args.verbose)
        server = _serve(8000)
        print("serving _docs/ on http://localhost:8000 (Ctrl-C stops)")
        try: threading.Event().wait()
        except KeyboardInterrupt: server.shutdown()


if __name__ == '__main__': main()
