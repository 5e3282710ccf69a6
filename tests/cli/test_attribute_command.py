"""``attribute``, ``score`` and ``report`` subcommands on a shrunk quickstart run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_bergson.attribution import Attributor, query_batch
from lightning_bergson.attribution.loading import load_model, load_text_data
from lightning_bergson.cli import main
from lightning_bergson.scores import ScoreArray

ROOT = Path(__file__).resolve().parents[2]
ROW = r"^ *\*? *\d+\. +\S+ +\[(\d+)\]"  # "  * 1.    +0.123  [42] text"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("quick")
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"].update(max_epochs=1, default_root_dir=str(tmp), enable_progress_bar=False)
    cfg["trainer"]["callbacks"][0]["init_args"]["path"] = str(tmp / "grads.zarr")
    cfg["data"]["init_args"].update(num_people=6, cache_dir=str(tmp / "cache"))
    (tmp / "quick.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp / "quick.yaml")])
    return tmp


def shown_ids(out: str, query: int) -> tuple[list[int], list[int]]:
    """The example ids ``attribute`` printed for ``query``: ``([top...], [bottom...])``."""
    block = out.split(f"Query {query}:")[1].split("\nQuery ")[0]
    top, _, low = block.partition("bottom ")
    return (
        [int(i) for i in re.findall(ROW, top, re.M)],
        [int(i) for i in re.findall(ROW, low, re.M)],
    )


def test_attribute_prints_top_and_bottom_and_writes_a_report(run, capsys):
    args = ["attribute", "--store", str(run / "grads.zarr"), "--model", str(run)]
    main([*args, "--fact", "[0, 2]", "--query", "Hello there", "--top_k", "3", "--bottom", "true"])
    out = capsys.readouterr().out
    _, data_hp = load_model(run)
    corpus = load_text_data(data_hp).corpus
    fact = corpus.facts[0]
    assert "Query 0: Hello there" in out
    assert f"Query 1: {fact.query} [answer: {fact.value}]" in out
    assert out.count("top 3:") == 3 and out.count("bottom 3:") == 3
    # which examples come back: the API's ranking with the command's defaults
    module, data_hp = load_model(run)
    data = load_text_data(data_hp)
    attr = Attributor(
        run / "grads.zarr", unit_norm=True, preconditioner="fit", example_reduce="mean"
    )
    queries = [("Hello there", None)] + [
        (f.query, f.answer) for f in (corpus.facts[0], corpus.facts[2])
    ]
    for q, (text, answer) in enumerate(queries):
        batch = query_batch(data.tokenizer, [text], answers=None if answer is None else [answer])
        scores, ids = attr.scores(attr.query_gradients(module, batch))
        order = np.argsort(-scores[0].numpy(), kind="stable")
        top, low = shown_ids(out, q)
        assert top == ids[order[:3]].tolist(), q
        assert low == ids[order[::-1][:3]].tolist(), q
    main([*args, "--fact", "0", "--report", str(run / "report"), "--unit_norm", "false"])
    page = (run / "report" / "report.html").read_text()
    assert fact.query in page and (run / "report" / "scores_q0.png").is_file()


def test_score_and_report_commands(run, capsys):
    store = str(run / "grads.zarr")
    out = run / "scores.zarr"
    main(["score", "--store", store, "--model", str(run), "--fact", "all", "--out", str(out)])
    arr = ScoreArray.open(out)
    module, data_hp = load_model(run)
    data = load_text_data(data_hp)
    facts = data.corpus.facts
    assert arr.scores.shape == (len(facts), len(data.texts))
    assert arr.metadata["relevant"][3] == list(facts[3].doc_ids)

    # the command's defaults: cosine, the fitted preconditioner, the mean of each example's rows
    attr = Attributor(store, unit_norm=True, preconditioner="fit", example_reduce="mean")
    batch = query_batch(data.tokenizer, [facts[3].query], answers=[facts[3].answer])
    want, ids = attr.scores(attr.query_gradients(module, batch))
    np.testing.assert_array_equal(arr.example_ids, ids)
    np.testing.assert_allclose(arr.scores[3], want[0].numpy(), rtol=1e-5, atol=1e-6)

    main(["report", "--scores", str(out), "--out", str(run / "rep"), "--top_k", "2"])
    md = (run / "rep" / "report.md").read_text()
    best = int(np.argmax(arr.scores[3]))
    assert facts[3].query in md and data.texts[int(arr.example_ids[best])] in md
    assert "report:" in capsys.readouterr().out


def test_readme_main_job_attribute_command(run, capsys):
    """The README's main job ends with ``attribute``; run it on the shrunk quickstart run."""
    readme = (ROOT / "README.md").read_text()
    main_job = next(c for c in re.findall(r"```bash\n(.*?)```", readme, re.S) if "fit --" in c)
    command = main_job.strip().split(" && ")[-1]
    assert command.startswith("python -m lightning_bergson attribute ")
    argv = shlex.split(command.replace("runs/quickstart", str(run)))[3:]
    main(argv)
    out = capsys.readouterr().out
    assert out.count("top 5:") == 3 and "Query 2:" in out
    arr_module, data_hp = load_model(run)
    data = load_text_data(data_hp)
    attr = Attributor(
        run / "grads.zarr", unit_norm=True, preconditioner="fit", example_reduce="mean"
    )
    for q, fact in enumerate(data.corpus.facts[:3]):  # --fact "[0, 1, 2]"
        batch = query_batch(data.tokenizer, [fact.query], answers=[fact.answer])
        scores, ids = attr.scores(attr.query_gradients(arr_module, batch))
        assert (
            shown_ids(out, q)[0] == ids[np.argsort(-scores[0].numpy(), kind="stable")[:5]].tolist()
        )


def test_score_and_attribute_refuse_a_damaged_store(run, tmp_path, capsys):
    """A damaged gradient chunk stops ``score`` and ``attribute`` with the named error (one
    line, exit 2), and the score array ``score`` had started is refused as incomplete, never
    read as zeros."""
    import shutil

    store = tmp_path / "grads.zarr"
    shutil.copytree(run / "grads.zarr", store)
    chunk = store / "rank_0" / "gradients" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    named = re.compile(r": error: .*rank_0/gradients chunk 0 \(rows 0-.*checksum")
    out = tmp_path / "scores.zarr"
    args = ["--store", str(store), "--model", str(run)]

    def fails(argv: list[str]) -> None:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and named.search(err[0]), err

    fails(["score", *args, "--fact", "all", "--out", str(out)])  # fitting the preconditioner
    assert not out.exists()
    fails(["score", *args, "--fact", "all", "--out", str(out), "--preconditioner", "none",
           "--example_reduce", "none"])  # the streaming scan  # fmt: skip
    with pytest.raises(ValueError, match=r"incomplete.*Write it again"):
        ScoreArray.open(out)
    fails(["attribute", *args, "--fact", "all", "--top_k", "3"])


def test_attribute_tokens_shows_spans_whose_scores_add_up(run, capsys):
    """``--tokens true``: each shown document's token scores add up to its inner product with
    the query computed here from rows made by the hooks (an independent backward), and the
    query tokens' scores to the match's score; the span is marked in the text and HTML."""
    store = str(run / "grads.zarr")
    main(["attribute", "--store", store, "--model", str(run), "--fact", "0", "--top_k", "2",
          "--tokens", "true", "--unit_norm", "false", "--preconditioner", "none",
          "--report", str(run / "tokens")])  # fmt: skip
    out = capsys.readouterr().out
    module, data_hp = load_model(run)
    data = load_text_data(data_hp)
    fact = data.corpus.facts[0]
    attr = Attributor(store, unit_norm=False, preconditioner=None, example_reduce="mean")
    q = attr.query_gradients(
        module, query_batch(data.tokenizer, [fact.query], answers=[fact.answer])
    )
    scores, ids = attr.scores(q)
    best = int(ids[int(np.argmax(scores[0]))])
    doc = query_batch(data.tokenizer, [data.texts[best]], append_eos=True)
    want = float(q[0].double() @ attr.query_gradients(module, doc)[0].double())
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if f"[{best}]" in line)
    span, total = re.search(r"span (\S+) of (\S+): .*\[\[.+\]\]", lines[first + 1]).groups()
    assert float(total) == pytest.approx(want, rel=2e-3) and float(span) > 0
    parts = re.findall(r" ([+-][0-9.e+-]+)(?:,|$)", lines[first + 2].split("query tokens:")[1])
    assert sum(map(float, parts)) == pytest.approx(float(scores[0].max()), rel=1e-2)
    page = (run / "tokens" / "report.html").read_text()
    assert page.count("<mark class='span'>") == 1 + 2 and "class='token-legend'" in page
