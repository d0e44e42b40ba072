"""Seeded synthetic question/answer tasks about pictures and short videos with known answers.

A sample is fully determined by `(task, seed, index)`, so a data set never needs to be stored to be
reproduced, and training/held-out splits are just different seeds. Answers are fixed by the sample
("red", "3", "red circle", "Picture 3 red"), so accuracy is an exact match.

Tasks (chance level in brackets):
  single      one shape; its colour [1/6], its shape [1/4] or both ("red circle") [1/24]
  digit       one digit 0-9 [1/10]
  count       a scene of 1-3 small shapes; how many [1/3]
  compare     two pictures; same colour / same shape? yes or no [1/2]
  distractor  K pictures of distinct shapes, each followed by its number ("<|image|> 3"); what colour is
              the shape in picture i [1/6], answered "Picture i <colour>" (naming the picture first puts
              its number right before the colour, where a model can look it up), or which picture shows
              X [1/K], answered by naming the pictures in order until X ("Picture 1 red circle 2 blue
              cross"; the last number is the answer): each step is the same look-up, and stopping is a
              match of words against the question's words
  video       3-5 shapes shown one after another at known times; what appeared first / last /
              after X [1/number of shapes]
  sequence    K pictures, one per user turn ("Picture i: <|image|>"), each named by the assistant as
              it arrives; scored on the last turn [1/24]. It teaches reading the newest picture.
  repeat      text only: "Repeat: w1 ... wn" -> "w1 ... wn" (8-20 words, invented names among them). It
              teaches copying what followed an earlier occurrence of a token (induction heads), the
              recall that the picture look-ups build on, for every token that a copy may meet.
  lookup      text only: K pictures described in a numbered list ("3 blue cross"), then "which picture
              shows X", answered with the distractor task's walk. It teaches the walk's counting and
              stopping without pictures.
  rag         retrieval-augmented naming: K retrieved pictures of distinct shapes, each with a description
              that gives it an invented name ("a dile is a red circle"), laid out as
              `hyperowl.processing.retrieval.rag_prompt` does (`<|image|> 3: a dile is a red circle`), then
              a new picture of one of them drawn afresh and "What is this called? Say which picture told
              you."; answered by naming the query picture's concept, then walking the descriptions in order
              until the one of that concept, then citing its number ("a red circle: 1: a lepe is a blue
              cross, 2: a dile is a red circle, picture 2") [1/K]. The walk is the `lookup` task's: every
              step copies the token that followed the one just written, and stopping compares the two words
              just copied with the two said first. Names are fresh per sample (two tokens, distinct first
              tokens), so they can only be read, not remembered.
With `TaskOptions.choice_probability`, questions of the tasks in `CHOICE_TASKS` are asked as lettered
multiple-choice prompts instead (the layout `hyperowl eval` uses), answered with the option's letter.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from PIL import Image

from hyperowl.processing.choices import format_question, option_letter
from hyperowl.processing.retrieval import RAG_QUESTION, PromptItem, item_line, rag_prompt
from hyperowl.processing.template import render_chat
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.synthetic.draw import COLOURS, SHAPES, digit_picture, scene_picture, shape_picture
from hyperowl.synthetic.video import SyntheticVideo, random_video


@dataclass
class Sample:
    """One conversation: `messages` (user/assistant turns ending with the assistant's `answer`), its
    pictures and videos.

    `cut` says whether the pictures are meant to be cut into tiles (only ever True for
    single-picture tasks; see `TaskOptions.cut_probability`). `named`: the shape a video "after X"
    question names ("red circle"), else "".
    """

    task: str
    messages: list[dict[str, str]]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[SyntheticVideo] = field(default_factory=list)
    answer: str = ""
    cut: bool = False
    named: str = ""

    @property
    def question(self) -> str:
        """The last user message (the one `answer` answers)."""
        return self.messages[-2]["content"]


@dataclass
class TaskOptions:
    """Knobs shared by all tasks.

    `image_size`: side of every picture in pixels. `distractors`: (min, max) number of pictures in
    the distractor and sequence tasks (the held-out test uses 16, 16). `video_events`: (min, max) shapes per video.
    `cut_probability`: chance that a single-picture sample is marked for cutting.
    `choice_probability`: chance that a sample of `CHOICE_TASKS` is asked as a multiple-choice question.
    `rag_pictures`: (min, max) retrieved pictures of the rag task (at most `len(NAME_STARTS)`).
    """

    image_size: int = 32
    distractors: tuple[int, int] = (16, 16)
    video_events: tuple[int, int] = (3, 5)
    cut_probability: float = 0.0
    choice_probability: float = 0.0
    rag_pictures: tuple[int, int] = (4, 4)


COMBOS: list[tuple[str, str]] = [(c, s) for c in COLOURS for s in SHAPES]

#: Every "colour shape" name, the answers of "What is in the picture?" and of video questions.
NAMES: list[str] = [f"{c} {s}" for c, s in COMBOS]

#: Tasks whose questions can be asked as multiple choice (their answers come from a fixed set).
CHOICE_TASKS = ("single", "digit", "count", "compare", "video")


def _qa(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def make_single(rng: random.Random, opts: TaskOptions) -> Sample:
    colour, shape = rng.choice(COMBOS)
    image, _ = shape_picture(rng, opts.image_size, colour, shape)
    kind = rng.choice(("colour", "shape", "both"))
    question, answer = {
        "colour": ("What colour is the shape?", colour),
        "shape": ("What shape is it?", shape),
        "both": ("What is in the picture?", f"{colour} {shape}"),
    }[kind]
    cut = rng.random() < opts.cut_probability
    return Sample("single", _qa(f"{IMAGE_TOKEN}\n{question}", answer), [image], answer=answer, cut=cut)


def make_digit(rng: random.Random, opts: TaskOptions) -> Sample:
    digit = rng.randrange(10)
    image = digit_picture(rng, opts.image_size, digit, rng.choice(list(COLOURS)))
    cut = rng.random() < opts.cut_probability
    return Sample("digit", _qa(f"{IMAGE_TOKEN}\nWhich digit is shown?", str(digit)), [image], answer=str(digit), cut=cut)


def make_count(rng: random.Random, opts: TaskOptions) -> Sample:
    count = rng.randint(1, 3)
    image, _ = scene_picture(rng, opts.image_size, count)
    cut = rng.random() < opts.cut_probability
    return Sample("count", _qa(f"{IMAGE_TOKEN}\nHow many shapes are there?", str(count)), [image], answer=str(count), cut=cut)


def make_compare(rng: random.Random, opts: TaskOptions) -> Sample:
    attribute = rng.choice(("colour", "shape"))
    same = rng.random() < 0.5
    first = rng.choice(COMBOS)
    if attribute == "colour":
        colour = first[0] if same else rng.choice([c for c in COLOURS if c != first[0]])
        second = (colour, rng.choice(SHAPES))
    else:
        shape = first[1] if same else rng.choice([s for s in SHAPES if s != first[1]])
        second = (rng.choice(list(COLOURS)), shape)
    images = [shape_picture(rng, opts.image_size, *combo)[0] for combo in (first, second)]
    prompt = f"Picture 1: {IMAGE_TOKEN}\nPicture 2: {IMAGE_TOKEN}\nDo the two shapes have the same {attribute}?"
    answer = "yes" if same else "no"
    return Sample("compare", _qa(prompt, answer), images, answer=answer)


def _walk_until(combos: Sequence[tuple[str, str]], target: int) -> str:
    """The answer to "which picture shows `combos[target]`": the pictures named in order up to it."""
    return "Picture " + " ".join(f"{i + 1} {c} {s}" for i, (c, s) in enumerate(combos[: target + 1]))


def _distinct_combos(rng: random.Random, opts: TaskOptions) -> list[tuple[str, str]]:
    """`opts.distractors` (min, max) distinct (colour, shape) pairs, in random order."""
    k = rng.randint(*opts.distractors)
    if not 1 <= k <= len(COMBOS):
        raise ValueError(f"distractor pictures must be 1..{len(COMBOS)}, got {k}")
    return rng.sample(COMBOS, k)


def make_distractor(rng: random.Random, opts: TaskOptions) -> Sample:
    combos = _distinct_combos(rng, opts)
    k = len(combos)
    images = [shape_picture(rng, opts.image_size, *combo)[0] for combo in combos]
    target = rng.randrange(k)
    listing = "".join(f"{IMAGE_TOKEN} {i + 1}\n" for i in range(k))
    colour, shape = combos[target]
    if rng.random() < 0.5:
        question, answer = f"Which picture shows a {colour} {shape}?", _walk_until(combos, target)
    else:
        question, answer = f"What colour is the shape in picture {target + 1}?", f"Picture {target + 1} {colour}"
    return Sample("distractor", _qa(listing + question, answer), images, answer=answer)


def make_lookup(rng: random.Random, opts: TaskOptions) -> Sample:
    combos = _distinct_combos(rng, opts)
    target = rng.randrange(len(combos))
    listing = "".join(f"{i + 1} {c} {s}\n" for i, (c, s) in enumerate(combos))
    colour, shape = combos[target]
    answer = _walk_until(combos, target)
    return Sample("lookup", _qa(f"{listing}Which picture shows a {colour} {shape}?", answer), answer=answer)


#: Invented names of the rag task are one of these starts and one of `NAME_ENDS`; the tokenizer of the
#: bundled model reads each such name as exactly two tokens (" di" + "ro").
NAME_STARTS: tuple[str, ...] = ("di", "le", "ha", "cho", "wit", "giv", "sam", "man")
NAME_ENDS: tuple[str, ...] = ("ag", "ro", "pe", "ly", "sw", "ow", "ir", "qu", "io", "ye", "de", "lo", "am", "be", "fo", "ic", "st", "te")


#: Words of the `repeat` task: numbers, colours, shapes, letters, the other words of the questions and
#: the rag task's invented names (a copy only works for tokens it was trained to copy).
REPEAT_WORDS: tuple[str, ...] = (
    *(str(i) for i in range(1, 100)),
    *COLOURS,
    *SHAPES,
    *(chr(c) for c in range(ord("A"), ord("Z") + 1)),
    *("picture", "video", "shape", "colour", "first", "last", "after", "before", "yes"),
    *("no", "what", "which", "show", "is", "the", "a", "in", "of"),
    *(start + end for start in NAME_STARTS for end in NAME_ENDS),
)


def make_repeat(rng: random.Random, opts: TaskOptions) -> Sample:
    words = " ".join(rng.choice(REPEAT_WORDS) for _ in range(rng.randint(8, 20)))
    return Sample("repeat", _qa(f"Repeat: {words}", words), answer=words)


def make_sequence(rng: random.Random, opts: TaskOptions) -> Sample:
    k = rng.randint(*opts.distractors)
    combos = [rng.choice(COMBOS) for _ in range(k)]
    images = [shape_picture(rng, opts.image_size, *combo)[0] for combo in combos]
    messages = []
    for i, (colour, shape) in enumerate(combos, 1):
        messages += _qa(f"Picture {i}: {IMAGE_TOKEN}\nWhat is in picture {i}?", f"{colour} {shape}")
    return Sample("sequence", messages, images, answer=messages[-1]["content"])


def invented_names(rng: random.Random, k: int) -> list[str]:
    """`k` invented names with distinct starts ("diro", "lepe", ...)."""
    if not 1 <= k <= len(NAME_STARTS):
        raise ValueError(f"rag pictures must be 1..{len(NAME_STARTS)}, got {k}")
    return [start + rng.choice(NAME_ENDS) for start in rng.sample(NAME_STARTS, k)]


def concept_text(colour: str, shape: str, name: str) -> str:
    """The description that names a concept: "a diro is a red circle"."""
    return f"a {name} is a {colour} {shape}"


def make_rag(rng: random.Random, opts: TaskOptions) -> Sample:
    k = rng.randint(*opts.rag_pictures)
    combos = rng.sample(COMBOS, k)
    names = invented_names(rng, k)
    texts = [concept_text(c, s, n) for (c, s), n in zip(combos, names)]
    target = rng.randrange(k)
    images = [shape_picture(rng, opts.image_size, *combo)[0] for combo in combos]
    images.append(shape_picture(rng, opts.image_size, *combos[target])[0])
    prompt = rag_prompt([PromptItem(t) for t in texts], RAG_QUESTION)
    colour, shape = combos[target]
    walk = ", ".join(item_line(i, PromptItem(text, media="")).strip() for i, text in enumerate(texts[: target + 1], 1))
    answer = f"a {colour} {shape}: {walk}, picture {target + 1}"
    return Sample("rag", _qa(prompt, answer), images, answer=answer)


def make_video(rng: random.Random, opts: TaskOptions) -> Sample:
    video = random_video(rng, opts.image_size, rng.randint(*opts.video_events))
    names = [event.item.name for event in video.events]
    kind = rng.choice(("first", "last", "after"))
    if kind == "first":
        question, answer = "What appeared first?", names[0]
    elif kind == "last":
        question, answer = "What appeared last?", names[-1]
    else:
        i = rng.randrange(len(names) - 1)
        question, answer = f"What appeared after the {names[i]}?", names[i + 1]
    named = names[i] if kind == "after" else ""
    return Sample("video", _qa(f"{VIDEO_TOKEN}\n{question}", answer), videos=[video], answer=answer, named=named)


def answer_space(sample: Sample) -> tuple[str, list[str]]:
    """Category of a `CHOICE_TASKS` sample's question and every answer it could have."""
    question = sample.question.split("\n")[-1]
    if sample.task == "digit":
        return "digit", [str(d) for d in range(10)]
    if sample.task == "count":
        return "count", ["1", "2", "3", "4"]
    if sample.task == "compare":
        return ("colour" if "colour" in question else "shape"), ["yes", "no"]
    if sample.task == "video":
        return question.split()[2].rstrip("?"), NAMES  # first / last / after
    if sample.task != "single":
        raise ValueError(f"{sample.task!r} questions have no fixed answer set; choose from {CHOICE_TASKS}")
    if "colour" in question:
        return "colour", list(COLOURS)
    if "shape is" in question:
        return "shape", list(SHAPES)
    return "object", NAMES


def choice_options(rng: random.Random, answer: str, space: Sequence[str], preferred: Sequence[str] = ()) -> tuple[list[str], int]:
    """Up to 4 options: `answer` and wrong ones from `space` (`preferred` wrong ones first), shuffled.

    Returns the options and the index of the right one.
    """
    wanted = min(3, len(space) - 1)
    wrong = [a for a in dict.fromkeys(preferred) if a != answer][:wanted]
    wrong += rng.sample([a for a in space if a != answer and a not in wrong], wanted - len(wrong))
    options = [answer, *wrong]
    rng.shuffle(options)
    return options, options.index(answer)


def sample_options(rng: random.Random, sample: Sample) -> tuple[list[str], int]:
    """`choice_options` for a `CHOICE_TASKS` sample; a video's wrong options are preferably its other shapes."""
    _, space = answer_space(sample)
    preferred: list[str] = []
    if sample.task == "video":
        shown = [event.item.name for event in sample.videos[0].events]
        preferred = rng.sample(shown, len(shown))
    return choice_options(rng, sample.answer, space, preferred)


def as_choice(rng: random.Random, sample: Sample) -> Sample:
    """`sample` asked as a lettered multiple-choice question, media placeholders first (the prompt
    layout of `hyperowl eval`); the answer is the right option's letter."""
    options, index = sample_options(rng, sample)
    media = VIDEO_TOKEN * len(sample.videos) + IMAGE_TOKEN * len(sample.images)
    question = sample.question.split("\n")[-1]
    letter = option_letter(index)
    return replace(sample, messages=_qa(f"{media}\n{format_question(question, options)}", letter), answer=letter)


TASKS: dict[str, Callable[[random.Random, TaskOptions], Sample]] = {
    "single": make_single,
    "digit": make_digit,
    "count": make_count,
    "compare": make_compare,
    "distractor": make_distractor,
    "video": make_video,
    "sequence": make_sequence,
    "repeat": make_repeat,
    "lookup": make_lookup,
    "rag": make_rag,
}


def make_sample(task: str, seed: int, index: int, opts: TaskOptions | None = None) -> Sample:
    """Sample number `index` of `task` for `seed`: the same arguments always give the same sample."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")
    opts = opts or TaskOptions()
    rng = random.Random(f"{task}:{seed}:{index}")
    sample = TASKS[task](rng, opts)
    if task in CHOICE_TASKS and opts.choice_probability > 0 and rng.random() < opts.choice_probability:
        sample = as_choice(rng, sample)
    return sample


class TaskMixture:
    """An endless, indexable stream of samples drawn from several tasks with relative `weights`.

    `mixture[i]` picks the task of sample i from `(seed, i)` and then builds `make_sample(task, seed, i)`.
    """

    def __init__(self, weights: dict[str, float], seed: int, opts: TaskOptions | None = None) -> None:
        unknown = [t for t in weights if t not in TASKS]
        if unknown or not weights:
            raise ValueError(f"unknown or no synthetic tasks {unknown}; choose from {', '.join(TASKS)}")
        self.tasks = list(weights)
        self.weights = [float(weights[t]) for t in self.tasks]
        self.seed = seed
        self.opts = opts or TaskOptions()

    def task_of(self, index: int) -> str:
        return random.Random(f"mixture:{self.seed}:{index}").choices(self.tasks, self.weights)[0]

    def __getitem__(self, index: int) -> Sample:
        return make_sample(self.task_of(index), self.seed, index, self.opts)


#: Tasks whose texts train a from-scratch tokenizer (`corpus`): all but rag, whose invented names are
#: made of that tokenizer's pieces and must stay unknown words to it.
CORPUS_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t != "rag")


def corpus(seed: int = 0, n: int = 2000, opts: TaskOptions | None = None) -> list[str]:
    """`n` conversations of every task of `CORPUS_TASKS` rendered in ChatML, e.g. to train a tokenizer on."""
    texts: list[str] = []
    for task in CORPUS_TASKS:
        for i in range(n):
            sample = make_sample(task, seed, i, opts)
            texts.append(render_chat(sample.messages))
    return texts
