"""Synthetic tasks: seeded, media written as described, videos with events at the stated times."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hyperowl.hub import DEFAULT_MODEL
from hyperowl.processing.choices import MC_INSTRUCTION
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.processing.video import load_video
from hyperowl.synthetic import TASKS, TaskMixture, TaskOptions, make_sample, write_dataset
from hyperowl.synthetic.accuracy import answer_samples
from hyperowl.synthetic.draw import COLOURS
from hyperowl.synthetic.tasks import CHOICE_TASKS, REPEAT_WORDS
from hyperowl.synthetic.video import NATIVE_FPS


def shows(image, colour):
    """Whether some pixel of `image` has exactly the RGB value of the named colour."""
    return bool((np.asarray(image) == COLOURS[colour]).all(-1).any())


def walked(answer):
    """A "which picture" answer (`Picture 1 red circle 2 blue cross`) as [(1, "red", "circle"), ...]."""
    words = answer.removeprefix("Picture ").split()
    return [(int(words[j]), words[j + 1], words[j + 2]) for j in range(0, len(words), 3)]


def pixels(sample):
    return [np.asarray(image) for image in sample.images] + [
        np.asarray(frame) for video in sample.videos for frame in video.clip().frames
    ]


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_sample(task):
    a, b = make_sample(task, 7, 3), make_sample(task, 7, 3)
    assert a.messages == b.messages and a.answer == b.answer
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    others = [make_sample(task, 8, i) for i in range(5)]
    assert any(o.messages != a.messages or not all(np.array_equal(x, y) for x, y in zip(pixels(o), pixels(a))) for o in others)


def test_mixture_is_seeded_and_follows_weights():
    mixture = TaskMixture({"single": 3, "compare": 1}, seed=1)
    tasks = [mixture.task_of(i) for i in range(400)]
    assert tasks == [TaskMixture({"single": 3, "compare": 1}, seed=1).task_of(i) for i in range(400)]
    assert 0.65 < tasks.count("single") / 400 < 0.85


def test_distractor_answers_name_the_right_picture():
    opts = TaskOptions(distractors=(16, 16))
    kinds = set()
    for i in range(40):
        s = make_sample("distractor", 0, i, opts)
        *listing, question = s.question.split("\n")
        assert listing == [f"{IMAGE_TOKEN} {n}" for n in range(1, 17)] and len(s.images) == 16
        if question.startswith("Which picture shows a "):
            colour, shape = question.removeprefix("Which picture shows a ").rstrip("?").split()
            walk = walked(s.answer)
            number = len(walk)
            assert walk[-1] == (number, colour, shape) and [n for n, _, _ in walk] == list(range(1, number + 1))
            for n, named, _ in walk:
                assert shows(s.images[n - 1], named)
        else:
            assert question.startswith("What colour is the shape in picture ")
            number = int(question.rstrip("?").split()[-1])
            assert s.answer.startswith(f"Picture {number} ")
            colour = s.answer.split()[-1]
        assert shows(s.images[number - 1], colour)
        kinds.add(question.split()[0])
    assert kinds == {"Which", "What"}


def test_repeat_answers_with_the_words_it_was_given():
    for i in range(20):
        s = make_sample("repeat", 0, i)
        words = s.answer.split()
        assert s.question == f"Repeat: {s.answer}" and 8 <= len(words) <= 20 and not s.images and not s.videos
        assert set(words) <= set(REPEAT_WORDS)


def test_lookup_walks_the_listed_pictures_until_the_asked_one():
    for i in range(20):
        s = make_sample("lookup", 0, i, TaskOptions(distractors=(2, 16)))
        *listing, question = s.question.split("\n")
        asked = question.removeprefix("Which picture shows a ").rstrip("?")
        named = [f"{n} {colour} {shape}" for n, colour, shape in walked(s.answer)]
        assert not s.images and not s.videos and 2 <= len(listing) <= 16
        assert named == listing[: len(named)] and named[-1].split(" ", 1)[1] == asked
        assert [line.split(" ", 1)[1] for line in listing].count(asked) == 1


def test_answers_are_consistent_with_questions():
    for i in range(20):
        s = make_sample("compare", 0, i)
        assert s.answer in ("yes", "no") and len(s.images) == 2
        s = make_sample("video", 0, i)
        names = [e.item.name for e in s.videos[0].events]
        assert len(set(names)) == len(names) and s.answer in names
        if "first" in s.question:
            assert s.answer == names[0]


def test_sequence_names_each_picture_as_it_arrives():
    s = make_sample("sequence", 0, 3, TaskOptions(distractors=(5, 5)))
    users, answers = s.messages[0::2], [m["content"] for m in s.messages[1::2]]
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 5
    assert all(m["content"] == f"Picture {i}: {IMAGE_TOKEN}\nWhat is in picture {i}?" for i, m in enumerate(users, 1))
    assert s.question == users[-1]["content"] and s.answer == answers[-1]
    for image, answer in zip(s.images, answers):  # each turn's answer names that turn's picture
        assert shows(image, answer.split()[0])


def test_choice_questions_use_the_eval_prompt_and_answer_with_the_letter():
    opts = TaskOptions(choice_probability=1.0)
    for task in CHOICE_TASKS:
        for i in range(10):
            open_sample = make_sample(task, 0, i)
            s = make_sample(task, 0, i, opts)
            lines = s.question.split("\n")
            assert s.images == open_sample.images and lines[0] == IMAGE_TOKEN * len(s.images) + VIDEO_TOKEN * len(s.videos)
            assert lines[1] == f"Question: {open_sample.question.split(chr(10))[-1]}" and lines[2] == "Options:"
            options = [line[3:] for line in lines[3:-1]]
            assert lines[-1] == MC_INSTRUCTION and len(options) == (2 if task == "compare" else 4)
            assert len(set(options)) == len(options) and options["ABCD".index(s.answer)] == open_sample.answer
            assert s.messages[1]["content"] == s.answer
    assert make_sample("distractor", 0, 0, opts).answer == make_sample("distractor", 0, 0).answer  # never multiple choice
    mixed = [make_sample("single", 0, i, TaskOptions(choice_probability=0.5)).answer in "ABCD" for i in range(200)]
    assert 70 < sum(mixed) < 130


def test_video_events_happen_at_stated_times(tmp_path):
    video = make_sample("video", 3, 0, TaskOptions(image_size=32)).videos[0]
    path = tmp_path / "v.mp4"
    video.write_mp4(path)
    clip = load_video(str(path), fps=NATIVE_FPS, max_frames=None)  # every frame
    assert len(clip) == video.num_frames()
    for event in video.events:
        x, y = event.item.centre
        for t in (event.start, (event.start + event.end) / 2, event.end - 1 / NATIVE_FPS):
            frame = np.asarray(clip.frames[round(t * NATIVE_FPS)]).astype(int)
            assert np.abs(frame[y, x] - COLOURS[event.item.colour]).max() < 40, (event, t)
        after = round(event.end * NATIVE_FPS)
        if after < len(clip):  # the shape is gone once its event ends
            frame = np.asarray(clip.frames[after]).astype(int)
            assert np.abs(frame[y, x] - COLOURS[event.item.colour]).max() > 40 or any(
                e.start == event.end and e.item.colour == event.item.colour for e in video.events
            )
    # the in-memory clip is what the processor samples from the file (1 frame per second)
    sampled, memory = load_video(str(path), fps=1.0, max_frames=16), video.clip(1.0, 16)
    assert sampled.timestamps == pytest.approx(memory.timestamps)
    for a, b in zip(sampled.frames, memory.frames):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).mean() < 6


def test_write_dataset_layout(tmp_path):
    jsonl = write_dataset(tmp_path, ["single", "compare", "video"], n=2, seed=0)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        for media in row["images"] + row["videos"]:
            assert not media.startswith("/") and (tmp_path / media).is_file()
        assert row["messages"][-1] == {"role": "assistant", "content": row["answer"]}


def test_default_model_answers_a_synthetic_question():
    from hyperowl.engine.generate import Owl3ForCausalLM
    from hyperowl.processing.processor import Owl3Processor

    model = Owl3ForCausalLM.from_pretrained(DEFAULT_MODEL)
    processor = Owl3Processor.from_pretrained(DEFAULT_MODEL)
    opts = TaskOptions(image_size=model.config.vision_config.image_size)
    sample = make_sample("single", 12345, 0, opts)
    assert answer_samples(model, processor, [sample], cut_enable=False) == [sample.answer]
    # one picture among 16: "What colour is the shape in picture i?" -> "Picture i <colour>", and
    # "Which picture shows X?" -> the pictures named in order until X (up to 37 words here)
    opts = TaskOptions(image_size=opts.image_size, distractors=(16, 16))
    samples = [make_sample("distractor", 12345, i, opts) for i in range(9)]
    assert sum("Which picture" in s.question for s in samples) == 4
    assert answer_samples(model, processor, samples) == [s.answer for s in samples]
