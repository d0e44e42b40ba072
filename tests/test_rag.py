"""Retrieval-augmented answers: KB checks, the LanceDB index (hybrid search, incremental and resumable
builds, tower fingerprints), citations, the CLI, the server's retrieval field, the synthetic rag task."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperowl.cli import DEFAULT_MODEL, main
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.engine.sampling import SamplingParams
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.retrieval import RAG_QUESTION, PromptItem, cited_pictures, rag_prompt
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.rag import (
    KnowledgeBaseError,
    PictureEmbedder,
    RagAnswerer,
    RagIndex,
    RagIndexError,
    Retrieved,
    build_index,
    cite,
    read_kb,
)
from hyperowl.rag.ask import rag_messages
from hyperowl.synthetic.draw import COLOURS
from hyperowl.synthetic.tasks import NAME_STARTS, TaskOptions, make_sample
from tests.media import block_image
from tests.tiny import save_tiny_checkpoint

PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128), (255, 128, 0)]
TEXTS = ["a red kettle", "a green lamp", "a blue teapot", "a yellow bicycle", "a cyan umbrella", "a magenta violin", "a grey anvil", "an orange kite"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model = Owl3ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    processor = Owl3Processor.from_pretrained(tiny_checkpoint)
    return model, processor, PictureEmbedder(model, processor.image_size)


def picture(i: int) -> Image.Image:
    """Picture i: a 4x4 grid of blocks in a colour pattern of its own."""
    colours = [PALETTE[(i + j * (i + 1)) % len(PALETTE)] for j in range(16)]
    return block_image(4, 4, 8, colours)


def write_kb(folder: Path, n: int = 8, lines: list[dict] | None = None) -> Path:
    (folder / "pics").mkdir(parents=True, exist_ok=True)
    rows = lines
    if rows is None:
        rows = []
        for i in range(n):
            picture(i).save(folder / "pics" / f"{i}.png")
            rows.append({"id": f"item{i}", "image": f"pics/{i}.png", "text": TEXTS[i % len(TEXTS)]})
    kb = folder / "kb.jsonl"
    kb.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return kb


def test_prompt_layout_numbers_each_picture_before_its_description():
    items = [PromptItem("a diro is a red circle"), PromptItem("notes", media=""), PromptItem("", media="video")]
    prompt = rag_prompt(items, "What is this?")
    assert prompt == f"{IMAGE_TOKEN} 1: a diro is a red circle\n2: notes\n{VIDEO_TOKEN} 3\n{IMAGE_TOKEN}\nWhat is this?"
    assert cited_pictures("a diro, picture 2; see Picture 1 and picture 2, not picture 7", 3) == [2, 1]


def test_kb_errors_name_the_line_and_nothing_is_written(tmp_path):
    picture(0).save(tmp_path / "a.png")
    cases = {
        "has no image, video or text": [{"id": "a", "image": "a.png"}, {"id": "b", "text": ""}],
        "image file not found": [{"id": "a", "image": "missing.png", "text": "x"}],
        "duplicate id 'a' (first on line 1)": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}],
        "needs an id": [{"text": "x"}],
        "unknown keys caption": [{"id": "a", "caption": "x"}],
    }
    for message, rows in cases.items():
        kb = write_kb(tmp_path, lines=rows)
        with pytest.raises(KnowledgeBaseError, match=re.escape(message)) as info:
            read_kb(kb)
        assert f"kb.jsonl:{len(rows)}:" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(KnowledgeBaseError, match="has no items"):
        build_index(tmp_path / "empty.jsonl", tmp_path / "index", None, "m", progress=False)
    assert not (tmp_path / "index").exists() and not (tmp_path / "index.building").exists()


def test_cli_reports_a_bad_kb_in_one_line_with_exit_2(tmp_path, tiny_checkpoint, capsys):
    kb = write_kb(tmp_path, lines=[{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    code = main(["rag", "index", str(kb), "--out", str(tmp_path / "index"), "--model", str(tiny_checkpoint)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"hyperowl rag: error: {kb}:2: duplicate id 'a' (first on line 1)"
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("flags", [["ask", "--index", "x", "--k", "0"], ["ask", "--index", "x", "--max-new-tokens", "0"],
                                   ["index", "kb.jsonl", "--out", "x", "--batch-size", "0"]])
def test_cli_refuses_a_count_below_one_by_name(flags, capsys):
    assert main(["rag", *flags]) == 2
    flag = flags[-2]
    assert capsys.readouterr().err.strip() == f"hyperowl rag: error: {flag} must be >= 1, got 0"


def test_index_finds_an_item_by_its_picture_and_by_its_text(tmp_path, tiny):
    _, _, embedder = tiny
    kb = write_kb(tmp_path)
    stats = build_index(kb, tmp_path / "index", embedder, "tiny", batch_size=3, progress=False)
    assert (stats.items, stats.embedded, stats.reused) == (8, 8, 0)
    assert not (tmp_path / "index.building").exists()
    index = RagIndex(tmp_path / "index", embedder, "tiny")
    assert index.count == 8 and index.manifest["fingerprint"] == embedder.fingerprint
    for i in range(8):
        top = index.search(image=picture(i), k=3)
        assert top[0].id == f"item{i}" and top[0].image_rank == 1 and top[0].similarity == pytest.approx(1.0, abs=1e-5)
    top = index.search(text="Where is the teapot?", k=2)
    assert top[0].id == "item2" and top[0].text_rank == 1 and top[0].image_rank == 0
    # hybrid: an item first in both lists scores 2 / (60 + 1)
    both = index.search(image=picture(5), text="violin", k=4)
    assert both[0].id == "item5" and both[0].score == pytest.approx(2 / 61)
    # a question of stop words and words no item has adds nothing to the picture ranking
    assert [r.id for r in index.search(image=picture(3), text=RAG_QUESTION, k=4)] == [r.id for r in index.search(image=picture(3), k=4)]


def test_reindexing_embeds_only_new_and_changed_items(tmp_path, tiny, monkeypatch):
    _, _, embedder = tiny
    kb = write_kb(tmp_path)
    build_index(kb, tmp_path / "index", embedder, "tiny", progress=False)
    before = RagIndex(tmp_path / "index", embedder, "tiny").table.to_arrow().to_pydict()
    rows = [json.loads(line) for line in kb.read_text().splitlines()]
    rows[1]["text"] = "a green lamp, repainted"
    picture(9).save(tmp_path / "pics" / "9.png")
    rows.append({"id": "item9", "image": "pics/9.png", "text": "a new drum"})
    del rows[0]
    write_kb(tmp_path, lines=rows)
    seen = []
    original = embedder.embed_paths
    monkeypatch.setattr(embedder, "embed_paths", lambda images, videos: seen.extend(images) or original(images, videos))
    stats = build_index(kb, tmp_path / "index", embedder, "tiny", progress=False)
    assert (stats.items, stats.embedded, stats.reused) == (8, 2, 6)
    assert sorted(Path(p).name for p in seen) == ["1.png", "9.png"]
    after = RagIndex(tmp_path / "index", embedder, "tiny").table.to_arrow().to_pydict()
    assert sorted(after["id"]) == sorted(r["id"] for r in rows)
    old = dict(zip(before["id"], before["vector"]))
    new = dict(zip(after["id"], after["vector"]))
    assert all(np.allclose(new[i], old[i]) for i in ("item2", "item5", "item7"))
    assert RagIndex(tmp_path / "index", embedder, "tiny").search(text="drum", k=1)[0].id == "item9"


def test_an_interrupted_build_leaves_the_old_index_and_resumes(tmp_path, tiny):
    _, _, embedder = tiny
    kb = write_kb(tmp_path)

    def stop_after_first(done):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(kb, tmp_path / "index", embedder, "tiny", batch_size=3, progress=False, on_batch=stop_after_first)
    assert not (tmp_path / "index").exists() and (tmp_path / "index.building").is_dir()
    stats = build_index(kb, tmp_path / "index", embedder, "tiny", batch_size=3, progress=False)
    assert (stats.embedded, stats.reused) == (5, 3)
    assert RagIndex(tmp_path / "index", embedder, "tiny").count == 8


def test_an_index_of_another_tower_is_refused_by_name(tmp_path, tiny):
    _, _, embedder = tiny
    build_index(write_kb(tmp_path), tmp_path / "index", embedder, "checkpoint-A", progress=False)
    other_dir = tmp_path / "other"
    save_tiny_checkpoint(other_dir, seed=1)
    other = PictureEmbedder(Owl3ForCausalLM.from_pretrained(other_dir, dtype=torch.float32), 32)
    assert other.fingerprint != embedder.fingerprint
    with pytest.raises(RagIndexError, match=re.escape(f"built with the vision tower of checkpoint-A (fingerprint {embedder.fingerprint}), not that of checkpoint-B")):
        RagIndex(tmp_path / "index", other, "checkpoint-B")
    with pytest.raises(RagIndexError, match="checkpoint-A"):  # nor is it updated with that tower
        build_index(tmp_path / "kb.jsonl", tmp_path / "index", other, "checkpoint-B", progress=False)
    # the same checkpoint loaded in bfloat16 has the same fingerprint
    model = Owl3ForCausalLM.from_pretrained(other_dir, dtype=torch.bfloat16)
    assert PictureEmbedder(model, 32).fingerprint == other.fingerprint


def test_an_empty_or_missing_index_is_refused(tmp_path, tiny):
    _, _, embedder = tiny
    with pytest.raises(RagIndexError, match="is not a hyperowl rag index"):
        RagIndex(tmp_path / "nothing", embedder, "tiny")
    build_index(write_kb(tmp_path, n=2), tmp_path / "index", embedder, "tiny", progress=False)
    RagIndex(tmp_path / "index", embedder, "tiny").table.delete("true")
    with pytest.raises(RagIndexError, match="is empty"):
        RagIndex(tmp_path / "index", embedder, "tiny")


def test_citations_are_the_pictures_the_answer_names():
    retrieved = [Retrieved(f"id{i}", f"/kb/{i}.png", "", f"text {i}", 1 / (61 + i)) for i in range(4)]
    citations = cite("a red circle is a diro, picture 3 (and picture 9)", retrieved)
    assert [(c.picture, c.item.id) for c in citations] == [(3, "id2")]
    assert citations[0].as_dict() == {"id": "id2", "picture": 3, "image": "/kb/2.png", "text": "text 2", "score": round(1 / 63, 6)}


def test_ask_shows_the_retrieved_items_and_the_query_picture(tmp_path, tiny, tiny_checkpoint, capsys):
    model, processor, embedder = tiny
    build_index(write_kb(tmp_path), tmp_path / "index", embedder, str(tiny_checkpoint), progress=False)
    answerer = RagAnswerer(model, processor, tmp_path / "index", str(tiny_checkpoint))
    seen = {}

    class Spy:
        def __call__(self, messages, **kw):
            seen.update(messages=messages, **kw)
            return processor(messages, **kw)

        def __getattr__(self, name):
            return getattr(processor, name)

    answerer.processor = Spy()
    result = answerer.ask("Which violin?", picture(5), k=3)
    assert result.retrieved[0].id == "item5" and len(result.retrieved) == 3
    content = seen["messages"][0]["content"]
    assert content.startswith(f"{IMAGE_TOKEN} 1: a magenta violin\n") and content.endswith(f"{IMAGE_TOKEN}\nWhich violin?")
    assert len(seen["images"]) == 4 and np.array_equal(np.asarray(seen["images"][-1]), np.asarray(picture(5)))
    assert result.citations == cite(result.answer, result.retrieved)
    picture(5).save(tmp_path / "q.png")
    code = main(["rag", "ask", "--model", str(tiny_checkpoint), "--index", str(tmp_path / "index"), "--image",
                 str(tmp_path / "q.png"), "--k", "2", "--max-new-tokens", "4", "--json", "Which violin?"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and set(out) == {"answer", "citations", "retrieved"}
    assert [r["picture"] for r in out["retrieved"]] == [1, 2] and out["retrieved"][0]["id"] == "item5"


def test_serve_answers_with_citations_and_refuses_an_unknown_index(tmp_path, tiny, tiny_checkpoint):
    from fastapi.testclient import TestClient

    from hyperowl.serve.app import create_app
    from hyperowl.serve.settings import ServerSettings

    model, processor, embedder = tiny
    build_index(write_kb(tmp_path), tmp_path / "index", embedder, "tiny", progress=False)
    app = create_app(model, processor, ServerSettings(), {"kb": RagIndex(tmp_path / "index", embedder, "tiny")})
    buffer = io.BytesIO()
    wide = picture(2).resize((96, 32))  # a shape the processor would cut into tiles
    wide.save(buffer, format="PNG")
    query = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}
    request = {"messages": [{"role": "user", "content": [query, {"type": "text", "text": "Which teapot?"}]}],
               "max_tokens": 6, "temperature": 0, "retrieval": {"index": "kb", "k": 3}}
    asked = RagAnswerer(model, processor, tmp_path / "index", "tiny").ask("Which teapot?", wide, k=3, params=SamplingParams(max_new_tokens=6))
    with TestClient(app) as client:
        body = client.post("/v1/chat/completions", json=request).json()
        assert body["retrieved"][0]["id"] == "item2" and len(body["retrieved"]) == 3
        message = body["choices"][0]["message"]
        assert message["content"] == asked.answer and body["retrieved"] == asked.as_dict()["retrieved"]  # the same prompt, uncut
        shown = [Retrieved(r["id"], r["image"] or "", r["video"] or "", r["text"], r["score"]) for r in body["retrieved"]]
        assert message["citations"] == [c.as_dict() for c in cite(message["content"], shown)]
        bad = client.post("/v1/chat/completions", json={**request, "retrieval": {"index": "nope"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "retrieval.index"
        assert bad.json()["error"]["message"] == "unknown retrieval index 'nope'; this server has kb"


def test_synthetic_rag_task_walks_the_descriptions_to_the_query_concept_and_cites_it():
    tokenizer = Owl3Processor.from_pretrained(DEFAULT_MODEL).tokenizer
    for i in range(20):
        sample = make_sample("rag", 5, i, TaskOptions(rag_pictures=(2, 8)))
        lines = sample.question.split("\n")[:-2]
        assert 2 <= len(lines) == len(sample.images) - 1 <= 8
        assert sample.question.endswith(f"{IMAGE_TOKEN}\n{RAG_QUESTION}")
        number = int(sample.answer.rsplit(" ", 1)[1])
        listed = [line.removeprefix(f"{IMAGE_TOKEN} ") for line in lines]  # "3: a witro is a red circle"
        concept = " ".join(listed[number - 1].split()[-2:])
        # the query's concept, every description up to the one of that concept, then its number
        assert sample.answer == f"a {concept}: {', '.join(listed[:number])}, picture {number}"
        assert [" ".join(line.split()[-2:]) for line in listed].count(concept) == 1
        colour = concept.split()[0]
        assert (np.asarray(sample.images[-1]) == COLOURS[colour]).all(-1).any()  # a fresh drawing of that concept
        assert not np.array_equal(np.asarray(sample.images[-1]), np.asarray(sample.images[number - 1]))
        names = [line.split()[2] for line in listed]
        assert len({n[: len(s)] for n in names for s in NAME_STARTS if n.startswith(s)}) == len(names)
        assert all(len(tokenizer.encode(" " + name)) == 2 for name in names)


def test_a_large_index_searches_through_an_ivf_index_with_the_same_results(tmp_path, tiny, monkeypatch):
    import hyperowl.rag.index as rag_index

    _, _, embedder = tiny
    rows = []
    (tmp_path / "pics").mkdir()
    for i in range(300):
        picture(i).save(tmp_path / "pics" / f"{i}.png")
        rows.append({"id": f"item{i}", "image": f"pics/{i}.png", "text": f"thing {i}"})
    rows.append({"id": "words", "text": "a text-only item"})
    kb = write_kb(tmp_path, lines=rows)
    build_index(kb, tmp_path / "flat", embedder, "tiny", progress=False)
    monkeypatch.setattr(rag_index, "ANN_MIN_ROWS", 300)
    build_index(kb, tmp_path / "ivf", embedder, "tiny", progress=False)
    flat, ivf = RagIndex(tmp_path / "flat", embedder, "tiny"), RagIndex(tmp_path / "ivf", embedder, "tiny")
    assert [i.index_type for i in ivf.table.list_indices() if i.columns == ["vector"]] == ["IvfFlat"]
    assert not [i for i in flat.table.list_indices() if i.columns == ["vector"]]
    for i in range(0, 300, 37):
        near = [r.similarity for r in ivf.search(image=picture(i), k=4)]
        assert near == pytest.approx([r.similarity for r in flat.search(image=picture(i), k=4)], abs=1e-5)
        assert near[0] == pytest.approx(1.0, abs=1e-5)
    assert ivf.search(text="text-only", k=1)[0].id == "words"


def test_video_and_text_only_items_are_indexed_and_shown_with_their_placeholders(tmp_path, tiny, tiny_checkpoint):
    from hyperowl.processing.tokenizer import VIDEO_TOKEN
    from hyperowl.processing.video import load_video
    from tests.media import write_video

    model, processor, embedder = tiny
    write_video(tmp_path / "clip.mp4", seconds=3, fps=4, codec="mpeg4")
    kb = write_kb(tmp_path, lines=[{"id": "film", "video": "clip.mp4", "text": "a short film"}, {"id": "note", "text": "a film note"}])
    build_index(kb, tmp_path / "index", embedder, "tiny", progress=False)
    index = RagIndex(tmp_path / "index", embedder, "tiny")
    frames = load_video(tmp_path / "clip.mp4", fps=1.0, max_frames=8).frames
    expected = embedder.embed_images(frames).mean(0)
    stored = dict(zip(*index.table.to_arrow().select(["id", "vector"]).to_pydict().values()))
    assert np.allclose(stored["film"], expected / np.linalg.norm(expected), atol=1e-5)
    # the text-only item never comes back from a picture search
    assert [r.id for r in index.search(image=frames[0], k=4)] == ["film"]
    answerer = RagAnswerer(model, processor, tmp_path / "index", "tiny")
    retrieved = answerer.retrieve("film", k=2)
    assert {r.id for r in retrieved} == {"film", "note"}
    content = rag_messages(retrieved, "Which film?", has_query_image=False)[0]["content"]
    lines = {"film": (f"{VIDEO_TOKEN} ", "a short film"), "note": ("", "a film note")}
    assert content == "".join(f"{lines[r.id][0]}{n}: {lines[r.id][1]}\n" for n, r in enumerate(retrieved, 1)) + "Which film?"
    result = answerer.ask("Which film?", k=2)  # the video is decoded and shown; no query picture
    assert [r.id for r in result.retrieved] == [r.id for r in retrieved]
