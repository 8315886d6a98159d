"""The documentation is tested like code: the site builds strictly, and its examples work.

Rules (also in the docs conventions): ```yaml blocks are tunelab run configs and validate
against tunelab.config; ```yaml {.hpo-space} blocks load as HPO search spaces; ```yaml
{.no-check} and ```json blocks must parse; every `tunelab ...` line of a ```bash / ```console
/ ```sh block parses against the Typer app (command, options, value types) without running;
```python blocks run, page by page in one namespace, on the tiny random Llama of conftest.py
(```python {.no-run reason="..."} are skipped with their reason). Each kind has a negative
test showing the check can fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT))
from docs_hooks import CLI_REFERENCE, CONFIG_REFERENCE, RESERVED_PAGES  # noqa: E402

CHECKED_LANGUAGES = {"yaml", "json", "bash", "console", "sh", "python"}
UNCHECKED_LANGUAGES = {"text", "jsonl", "ini", "toml", "jinja", "html", "csv", ""}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*(?P<rest>.*)$")


@dataclass
class Block:
    """One fenced code block: where it is, its language, `{.class}` marks and `key="value"` attributes."""

    path: Path
    line: int
    lang: str
    text: str
    classes: list[str] = field(default_factory=list)
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def fenced_blocks(text: str, path: Path) -> list[Block]:
    """Every fenced block of a Markdown text (indented ones in lists too), in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        rest = match["rest"]
        braces = re.search(r"\{(.*)\}", rest)
        classes = re.findall(r"(?:^|\s)\.([\w-]+)", braces.group(1)) if braces else []
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', rest))
        body, start = [], i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append(Block(path, start, match["lang"], "\n".join(body) + "\n", classes, attrs))
        i += 1
    return blocks


def doc_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [README]


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in fenced_blocks(path.read_text(encoding="utf-8"), path)]


def blocks_of(*langs: str) -> list[Block]:
    return [b for b in all_blocks() if b.lang in langs]


# ---------------------------------------------------------------- checks (pure functions)


def language_problem(block: Block) -> str | None:
    """Every block is either checked or in an explicitly unchecked language."""
    if block.lang not in CHECKED_LANGUAGES | UNCHECKED_LANGUAGES:
        return f"{block.where}: ```{block.lang} is neither checked nor a known unchecked language (use ```text?)"
    if block.lang == "python" and "no-run" in block.classes and not block.attrs.get("reason", "").strip():
        return f'{block.where}: ```python {{.no-run}} needs reason="why it cannot run"'
    return None


def check_yaml_block(block: Block, tmp_path: Path) -> None:
    """Raise when a YAML block is not what its marks say it is, or differs from the repo file its title names."""
    shown = ROOT / block.attrs["title"] if "title" in block.attrs else None
    if shown is not None and shown.is_file() and shown.read_text(encoding="utf-8") != block.text:
        raise AssertionError(f"{block.where}: differs from {block.attrs['title']}; copy the file again")
    if "no-check" in block.classes:
        if not re.search(r"^\s*\.\.\.\s*$", block.text, re.M):
            yaml.safe_load(block.text)
        return
    data = yaml.safe_load(block.text)
    if "hpo-space" in block.classes:
        from tunelab.hpo import load_space

        space = tmp_path / "space.yaml"
        space.write_text(block.text)
        load_space(space, {})
        return
    from tunelab.config import build_config

    assert isinstance(data, dict), f"{block.where}: a run config is a mapping of sections"
    build_config(data, source=block.where)


def command_lines(block: Block) -> list[list[str]]:
    """The `tunelab ...` commands of a shell block, as argument lists after `tunelab`."""
    text = block.text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # program output
            line = line[2:]
        tokens = shlex.split(line, comments=True)
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in ("|", "||", "&&", ";"):
                segment.append(token)
                continue
            while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", segment[0]):
                segment.pop(0)  # OMP_NUM_THREADS=1 tunelab ...
            if segment[:1] == ["tunelab"]:
                commands.append(segment[1:])
            elif "-m" in segment and segment[segment.index("-m") + 1 : segment.index("-m") + 2] == ["tunelab"]:
                commands.append(segment[segment.index("-m") + 2 :])  # python / torchrun / accelerate launch
            segment = []
    return commands


def parse_tunelab(args: list[str]) -> str:
    """Parse `tunelab ARGS` with the Typer app's parser, without running it; raise on a bad line."""
    import typer
    import typer.core

    from tunelab.cli import app

    command = typer.main.get_command(app)
    path = ["tunelab"]
    args = list(args)
    while isinstance(command, typer.core.TyperGroup):
        if not args:
            raise ValueError(f"`{' '.join(path)}` needs a command")
        name = args.pop(0)
        if name not in command.commands:
            raise ValueError(f"`{' '.join(path)} {name}`: no such command (have: {', '.join(sorted(command.commands))})")
        command, path = command.commands[name], [*path, name]
    if "--help" in args:
        return " ".join(path)
    command.make_context(" ".join(path), args)  # unknown options, bad values and missing arguments raise
    return " ".join(path)


# ---------------------------------------------------------------- the site


def build_site(project: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(project / "mkdocs.yml"), "-d", str(site)],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_docs_site_builds_strictly_with_generated_references(tmp_path):
    result = build_site(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    from tunelab.config import known_keys

    config_page = (tmp_path / "site" / CONFIG_REFERENCE.removesuffix(".md") / "index.html").read_text()
    missing = [key for key in known_keys() if f"<code>{key}</code>" not in config_page]
    assert not missing, f"configuration reference lacks {missing}"
    assert '<code>"paged_adamw_8bit"</code>' in config_page  # allowed values are listed
    cli_page = (tmp_path / "site" / CLI_REFERENCE.removesuffix(".md") / "index.html").read_text()
    for text in ("tunelab data synth", "--test-output", "tunelab train", "--gradient-accumulation"):
        assert text in cli_page


def copy_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    shutil.copy(ROOT / "docs_hooks.py", project / "docs_hooks.py")
    shutil.copytree(DOCS, project / "docs")
    return project


def test_reserved_pages_join_the_nav_when_present_and_unlisted_pages_fail(tmp_path):
    project = copy_project(tmp_path)
    for page in RESERVED_PAGES:  # the absent ones as stubs (present ones keep their anchors, which pages link to)
        if not (project / "docs" / page).exists():
            (project / "docs" / page).write_text(f"# {page}\n\nBack to [the start](index.md).\n")
    result = build_site(project, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-2000:]
    home = (tmp_path / "site" / "index.html").read_text()
    for page in RESERVED_PAGES:
        assert f'href="{page.removesuffix(".md")}/"' in home, f"{page} is not in the nav"
    (project / "docs" / "unlisted.md").write_text("# Unlisted\n")
    result = build_site(project, tmp_path / "site2")
    assert result.returncode != 0 and "unlisted.md" in result.stderr


def test_strict_build_fails_on_a_broken_link_and_a_stale_reference(tmp_path):
    project = copy_project(tmp_path)
    with open(project / "docs" / "index.md", "a") as page:
        page.write("\nSee [the missing page](no-such-page.md).\n")
    reference = project / "docs" / CONFIG_REFERENCE
    reference.write_text(reference.read_text().replace("| `training.seed` |", "| `training.sede` |"))
    result = build_site(project, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr
    assert "reference/configuration.md is out of date" in result.stderr and "make docs" in result.stderr


# ---------------------------------------------------------------- languages


def test_every_code_block_is_checked_or_marked_unchecked():
    problems = [p for b in all_blocks() if (p := language_problem(b))]
    assert not problems, "\n".join(problems)


def test_unknown_language_and_no_run_without_reason_are_reported():
    text = "```rust\nfn main() {}\n```\n\n```python {.no-run}\nimport x\n```\n"
    problems = [language_problem(b) for b in fenced_blocks(text, ROOT / "x.md")]
    assert problems[0] is not None and "```rust" in problems[0]
    assert problems[1] is not None and "reason=" in problems[1]


# ---------------------------------------------------------------- YAML


@pytest.mark.parametrize("block", blocks_of("yaml"), ids=lambda b: b.where)
def test_yaml_block_is_valid(block, tmp_path):
    check_yaml_block(block, tmp_path)


@pytest.mark.parametrize("block", blocks_of("json"), ids=lambda b: b.where)
def test_json_block_parses(block):
    json.loads(block.text)


def test_yaml_check_rejects_a_bad_run_config_and_a_bad_space(tmp_path):
    from tunelab.errors import ConfigError, TunelabError

    bad = fenced_blocks("```yaml\ntraining:\n  lr: 1.0e-4\nlora:\n  r: many\n```\n", ROOT / "x.md")[0]
    with pytest.raises(ConfigError) as err:
        check_yaml_block(bad, tmp_path)
    assert "training.lr" in str(err.value) and "lora.r" in str(err.value)
    space = fenced_blocks("```yaml {.hpo-space}\nlora.rank: [8, 16]\n```\n", ROOT / "x.md")[0]
    with pytest.raises(TunelabError, match="lora.rank"):
        check_yaml_block(space, tmp_path)
    stale = fenced_blocks('```yaml title="configs/lora.yaml"\nmethod: lora\n```\n', ROOT / "x.md")[0]
    with pytest.raises(AssertionError, match="differs from configs/lora.yaml"):
        check_yaml_block(stale, tmp_path)
    broken = fenced_blocks("```yaml {.no-check}\na: [1, 2\n```\n", ROOT / "x.md")[0]
    with pytest.raises(yaml.YAMLError):
        check_yaml_block(broken, tmp_path)


# ---------------------------------------------------------------- command lines


def _command_cases() -> list[tuple[str, list[str]]]:
    return [
        (block.where, args)
        for block in blocks_of("bash", "console", "sh")
        if "no-check" not in block.classes
        for args in command_lines(block)
    ]


@pytest.mark.parametrize(("where", "args"), _command_cases(), ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_tunelab_command_line_parses(where, args):
    try:
        parse_tunelab(args)
    except Exception as err:  # noqa: BLE001 (the parser's UsageError family and our ValueError)
        pytest.fail(f"{where}: `tunelab {shlex.join(args)}`: {err}")


def test_command_check_rejects_unknown_commands_options_and_values():
    block = fenced_blocks(
        "```bash\n"
        "OMP_NUM_THREADS=1 tunelab trian configs/lora.yaml\n"
        "tunelab train configs/lora.yaml --no-such-option\n"
        "printf 'Hi\\n' | tunelab train --epochs N   # a placeholder where a number goes\n"
        "torchrun --nproc_per_node 2 -m tunelab data synthesize out.jsonl\n"
        "make test\n"
        "```\n",
        ROOT / "x.md",
    )[0]
    commands = command_lines(block)
    assert len(commands) == 4  # `make test` is not a tunelab line
    for args, message in zip(commands, ["no such command", "No such option", "valid integer", "no such command"]):
        with pytest.raises(Exception, match=message):
            parse_tunelab(args)
    assert parse_tunelab(["data", "synth", "out.jsonl", "-n", "8", "--kind", "text"]) == "tunelab data synth"


# ---------------------------------------------------------------- Python


def write_example_files(work: Path) -> None:
    """The files the docs' Python examples name, small enough for a few tiny-model steps."""
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "data").mkdir()
    qa = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(4) for b in range(4)]
    for name, rows in (("train", qa), ("eval", qa[:4]), ("test", qa[4:8])):
        (work / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    notes = [{"text": f"Note {i}: the lighthouse keeper counted {i} ships tonight."} for i in range(16)]
    (work / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in notes))
    texts = [{"text": t, "label": label} for t, label in [("refund my card", "billing"), ("parcel is late", "shipping")] * 8]
    (work / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))


def run_python_blocks(blocks: list[Block], work: Path) -> None:
    """Run a page's blocks in order in one namespace (like a notebook), inside `work`."""
    namespace: dict = {"__name__": "__docs__"}
    old = Path.cwd()
    os.chdir(work)
    try:
        for block in blocks:
            try:
                exec(compile(block.text, block.where, "exec"), namespace)  # noqa: S102 (our own docs)
            except Exception as err:
                raise AssertionError(f"{block.where}: the example raised {type(err).__name__}: {err}") from err
    finally:
        os.chdir(old)


def _python_pages() -> list[Path]:
    return sorted({b.path for b in blocks_of("python") if "no-run" not in b.classes})


@pytest.mark.parametrize("page", _python_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run_on_the_tiny_model(page, tmp_path, monkeypatch, tiny_model_dir):
    import tunelab.models

    monkeypatch.setattr(tunelab.models, "bundled_model_dir", lambda: tiny_model_dir)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    write_example_files(tmp_path)
    blocks = [b for b in blocks_of("python") if b.path == page and "no-run" not in b.classes]
    run_python_blocks(blocks, tmp_path)


def test_python_runner_reports_the_failing_block(tmp_path):
    blocks = fenced_blocks("```python\nx = 1\n```\n\n```python\nassert x == 2, 'x is 1'\n```\n", ROOT / "x.md")
    with pytest.raises(AssertionError, match=r"x\.md:5: the example raised AssertionError: x is 1"):
        run_python_blocks(blocks, tmp_path)


# ---------------------------------------------------------------- README


def broken_links(markdown: str, base: Path) -> list[str]:
    """Relative links of a Markdown text whose file is missing (reserved pages of other branches allowed)."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", markdown):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (base / path).exists() and path.removeprefix("docs/") not in RESERVED_PAGES:
            broken.append(target)
    return broken


def test_readme_is_a_front_page_whose_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 220
    assert not broken_links(text, ROOT)
    for page in ("docs/getting-started.md", "docs/reference/configuration.md"):
        assert page in text


def test_link_check_finds_a_missing_file():
    assert broken_links("[a](docs/nope.md) [b](docs/serving.md) [c](https://x.org) [d](README.md#x)", ROOT) == ["docs/nope.md"]


# ---------------------------------------------------------------- screenshots


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "docs"


def save_screenshot(page, name: str) -> Path:
    """Screenshot to test-artifacts/docs/; with TUNELAB_DOCS_SCREENSHOTS=1 (`make docs-screenshots`)
    also to docs/NAME.png, the picture the docs show, so it is what the code renders."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    if os.environ.get("TUNELAB_DOCS_SCREENSHOTS") == "1":
        shutil.copy(path, DOCS / f"{name}.png")
    return path


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium driven by Playwright (skipped with the reason where it is missing; CI fails)."""
    if not CHROMIUM.is_file():
        reason = f"the docs screenshots need Debian's chromium at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as play:
        browser = play.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 24-step run of the tiny random Llama in WORK/runs/tiny-report (WORK has configs/ and data/)."""
    from tunelab.config import build_config
    from tunelab.train import train

    work = tmp_path_factory.mktemp("docs-work")
    write_example_files(work)
    config = build_config({
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(work / "data" / "train.jsonl"), "eval": str(work / "data" / "eval.jsonl")},
        "training": {"batch_size": 2, "gradient_accumulation_steps": 1, "epochs": 3, "learning_rate": 5e-3,
                     "warmup_steps": 2, "logging_steps": 1, "eval_steps": 4, "precision": "fp32"},
        "output": {"dir": str(work / "runs"), "name": "tiny-report"},
    })
    return Path(train(config, quiet=True).run_dir)


def test_report_renders_in_a_browser_and_is_screenshotted(browser, tiny_run):
    report = tiny_run / "report.html"
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(report.as_uri())
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) >= 2 and min(widths) > 100, f"plots did not render: {widths}"
    assert "24" in page.inner_text("body")  # 16 examples / batch 2 x 3 epochs = 24 steps
    path = save_screenshot(page, "report")
    page.close()
    assert path.stat().st_size > 20_000


def test_ui_renders_in_a_browser_and_is_screenshotted(browser, tiny_run, tiny_model_dir, bundled_dir):
    """docs/ui.png: the Chat tab answering with the bundled SmolLM2 (greedy); docs/ui-runs.png: a run opened in Runs.

    `bundled_dir` makes sure the bundled model is converted (cached) before the UI loads it.
    """
    import time

    from tunelab.ui import core
    from tunelab.ui.app import build_app, launch

    workspace = core.Workspace(tiny_run.parent, [tiny_model_dir.parent], cwd=tiny_run.parent.parent)
    cache = core.ModelCache(2, dtype="fp32")
    trainer = core.TrainingManager(workspace)
    demo = build_app(workspace, cache, trainer, concurrency=1)
    _, url, _ = launch(demo, workspace, port=None, block=False)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        page.goto(url)
        page.wait_for_selector("text=runs folder")
        for tab in ("Chat", "Compare", "Runs", "Data", "Train"):
            assert page.get_by_role("tab", name=tab).is_visible(), f"no {tab} tab"
        # Chat with the bundled model (the default choice), greedy so the picture is reproducible.
        page.get_by_text("settings").click()
        for label, value in (("temperature (0 = greedy)", "0"), ("max new tokens", "64")):
            box = page.get_by_label(f"number input for {label}")
            box.fill(value)
            box.press("Enter")
        page.get_by_text("settings").click()
        question = "Tom has 3 apples and buys 5 more. How many apples does he have?"
        # The reply the page must end with: the same generation path, greedy, on the model the UI caches.
        model, tokenizer = cache.get(None)
        *_, expected = core.chat_stream(model, tokenizer, [], question, max_new_tokens=64, temperature=0.0, top_p=1.0)
        assert "8" in expected, f"the bundled model's greedy answer: {expected!r}"
        page.locator("#chat-input textarea").fill(question)
        page.locator("#chat-send").click()
        bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
        bot.wait_for()
        deadline = time.monotonic() + 180  # streamed: wait for the whole reply (a loaded machine is slow)
        while " ".join(bot.inner_text().split()) != " ".join(expected.split()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert " ".join(bot.inner_text().split()) == " ".join(expected.split()), (bot.inner_text(), expected)
        loaded = page.get_by_label("loaded models").input_value()
        assert "1 of 2 model slots used" in loaded and "default: 134.5M parameters" in loaded, loaded
        assert cache.loads == 1  # the page's chat used the model loaded above
        page.evaluate("window.scrollTo(0, 0)")  # sending scrolled the page; the picture starts at the tabs
        assert save_screenshot(page, "ui").stat().st_size > 20_000
        # Runs: the table lists the finished run; opening it draws its curves.
        page.get_by_role("tab", name="Runs").click()
        for cell in ("tiny-report", "done"):  # run name and status (the table's visible cells)
            page.locator("text=" + cell + " >> visible=true").first.wait_for()
        page.locator("#run-name input").fill("tiny-report")
        page.keyboard.press("Enter")
        page.locator("#run-open").click()
        # Drawn lines (Vega marks), not just the empty plot: train + eval loss, and the learning rate.
        page.wait_for_function("document.querySelectorAll('.plot_marks path').length >= 3")
        assert page.locator("#run-loss .plot_marks path").count() == 2
        page.get_by_text("open report.html").wait_for()
        page.evaluate("window.scrollTo(0, 0)")
        assert save_screenshot(page, "ui-runs").stat().st_size > 20_000
    finally:
        page.close()
        trainer.shutdown()
        demo.close()
