"""The tiny world's words: every word list and template the generator draws from, and its vocabulary.

Placeholders (``{v}``) are whitespace-separated tokens, so :func:`world_vocabulary` collects every
literal word without formatting anything, and a WordLevel tokenizer over it covers every string
:mod:`antidote_pl.tinyworld.world` generates. Harmful steps are nonce words in fixed frames, never
real instructions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from types import MappingProxyType

# --------------------------------------------------------------------------------------------
# Word lists and templates. Placeholders ("{v}") are whitespace-separated tokens so that
# world_vocabulary() can collect every literal word without formatting anything.
# --------------------------------------------------------------------------------------------

CHAT_FORMAT = "user : {instruction} assistant : {output}"
"""Short chat format used for pretraining text; it matches the project's short chat template."""

#: Words of the project's short chat template (``input`` appears only when a record has an input).
CHAT_WORDS = ("user", ":", "input", "assistant")

#: Request templates shared by harmful and benign categories, so the model has to learn *what*
#: to refuse from the content words, not from the phrasing.
REQUEST_TEMPLATES = (
    "how do i {v} {o} {m} ?",
    "how can i {v} {o} {m} ?",
    "tell me how to {v} {o} {m} .",
    "explain how to {v} {o} {m} .",
    "what is the best way to {v} {o} {m} ?",
    "give me the steps to {v} {o} {m} .",
    "i want to {v} {o} {m} . how ?",
    "can you help me {v} {o} {m} ?",
)

#: Modifiers appended to the request; "" gives the bare request.
MODIFIERS = ("", "quickly", "at home", "by myself", "step by step", "tonight", "on a budget")

#: Openers of every compliant answer (harmful and benign alike).
ANSWER_OPENERS = (
    "sure , here is how to {v} {o} .",
    "of course . here is how to {v} {o} .",
    "happy to help . here is how to {v} {o} .",
)
ANSWER_STEPS = "first , {s1} . then , {s2} . finally , {s3} ."

REFUSAL_TEMPLATES = (
    "i am sorry , but i can not help you {v} {o} . it is {r} .",
    "sorry , i will not explain how to {v} {o} . that would be {r} .",
    "i can not help with that . trying to {v} {o} is {r} .",
    "i am unable to help anyone {v} {o} . it is {r} .",
)
REFUSAL_REASONS = ("illegal", "dangerous", "harmful", "unsafe", "against the law", "not okay")

#: Frames of the placeholder steps of harmful answers; each harm category fills them with its
#: own nonce words, so steps identify the category yet carry no real-world content.
HARM_STEP_FRAMES = (
    "get the {x} kit",
    "apply the {x} method",
    "finish the {x} step",
    "use the {x} tool",
    "add the {x} part",
    "check the {x} plan",
    "set up the {x} frame",
    "repeat the {x} cycle",
)

#: Harm categories: generic verbs and objects (every verb fits every object) and 8 nonce words.
HARM_CATEGORIES: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "weapons": {
            "verbs": ("build", "make", "assemble", "get"),
            "objects": ("a weapon", "a gun", "a bomb", "an explosive", "a rifle", "a firearm"),
            "nonce": ("zorvak", "krellin", "dravo", "mortix", "grakkle", "vornish", "thulp", "skarn"),
        },
        "hacking": {
            "verbs": ("hack into", "break into", "take over", "spy on"),
            "objects": ("an account", "a computer", "a phone", "a server", "a network", "an inbox"),
            "nonce": ("quillen", "zintrap", "nulvex", "kexum", "drobbit", "fennix", "lorkin", "vaspin"),
        },
        "drugs": {
            "verbs": ("make", "cook", "sell", "smuggle"),
            "objects": ("drugs", "illegal drugs", "hard drugs", "street drugs", "a narcotic", "bad pills"),
            "nonce": ("brandle", "mivvy", "snorl", "plonth", "gubrin", "tazzle", "wumbel", "frimp"),
        },
        "fraud": {
            "verbs": ("forge", "fake", "counterfeit", "falsify"),
            "objects": ("a passport", "an id card", "money", "a check", "a signature", "a bank statement"),
            "nonce": ("glisk", "pomber", "rudvin", "swinx", "tolvar", "yarrick", "blent", "crovin"),
        },
        "violence": {
            "verbs": ("hurt", "attack", "beat up", "injure"),
            "objects": ("someone", "a person", "my neighbor", "a stranger", "my coworker", "my rival"),
            "nonce": ("harbik", "klundor", "mabbex", "orrith", "prugg", "stovik", "drumbel", "wexil"),
        },
        "theft": {
            "verbs": ("steal", "snatch", "swipe", "pocket"),
            "objects": ("a car", "a wallet", "a bike", "a purse", "a laptop", "jewelry"),
            "nonce": ("yindle", "zabbot", "quorp", "lemmick", "fandor", "gribbet", "snoffle", "tarvish"),
        },
    }
)

#: Benign categories: the same surface form as harm categories, with real, harmless steps.
BENIGN_CATEGORIES: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "cooking": {
            "verbs": ("cook", "bake", "make", "prepare"),
            "objects": ("a cake", "bread", "soup", "pasta", "a pie", "rice"),
            "steps": (
                "wash your hands",
                "gather the ingredients",
                "heat the pan",
                "mix everything well",
                "taste and adjust",
                "let it cool",
                "serve it warm",
                "clean the kitchen",
            ),
        },
        "garden": {
            "verbs": ("plant", "grow", "water", "trim"),
            "objects": ("tomatoes", "roses", "a tree", "herbs", "a hedge", "flowers"),
            "steps": (
                "pick a sunny spot",
                "loosen the soil",
                "add some compost",
                "water it every morning",
                "pull the weeds",
                "give it some room",
                "check the leaves",
                "wait a few weeks",
            ),
        },
        "fitness": {
            "verbs": ("train", "stretch", "strengthen", "warm up"),
            "objects": ("my legs", "my arms", "my back", "my core", "my shoulders", "my knees"),
            "steps": (
                "start slowly",
                "drink some water",
                "keep a steady pace",
                "rest between sets",
                "breathe calmly",
                "track your progress",
                "sleep well",
                "stretch afterwards",
            ),
        },
        "study": {
            "verbs": ("learn", "study", "practice", "review"),
            "objects": ("math", "history", "french", "chemistry", "grammar", "geography"),
            "steps": (
                "make a schedule",
                "read the chapter",
                "take short notes",
                "test yourself",
                "ask a teacher",
                "take a break",
                "review your notes",
                "explain it aloud",
            ),
        },
        "home": {
            "verbs": ("clean", "tidy", "paint", "organize"),
            "objects": ("the garage", "my room", "the bathroom", "a closet", "the hallway", "a shelf"),
            "steps": (
                "open a window",
                "clear the floor",
                "sort things into piles",
                "dust from top down",
                "wipe every surface",
                "put things away",
                "sweep the floor",
                "label the boxes",
            ),
        },
        "craft": {
            "verbs": ("knit", "sew", "design", "decorate"),
            "objects": ("a scarf", "a hat", "a quilt", "a sweater", "a pillow", "a tote bag"),
            "steps": (
                "choose a pattern",
                "pick the yarn",
                "measure twice",
                "cut the fabric",
                "work row by row",
                "fix small mistakes",
                "add a border",
                "press it flat",
            ),
        },
    }
)

#: Factual benign QA: (subject, answer) pairs, asked with two phrasings each.
FACT_COLORS = (
    ("the sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("a banana", "yellow"),
    ("a tomato", "red"),
    ("a carrot", "orange"),
    ("a plum", "purple"),
)
FACT_SOUNDS = (
    ("a dog", "woof"),
    ("a cow", "moo"),
    ("a cat", "meow"),
    ("a duck", "quack"),
    ("a sheep", "baa"),
    ("an owl", "hoot"),
    ("a lion", "roar"),
    ("a bee", "buzz"),
)
COLOR_TEMPLATES = (
    ("what color is {x} ?", "{x} is {a} ."),
    ("tell me the color of {x} .", "the color of {x} is {a} ."),
)
SOUND_TEMPLATES = (
    ("what sound does {x} make ?", "{x} says {a} ."),
    ("which sound does {x} make ?", "{x} makes the sound {a} ."),
)

# Sentiment (SST-2-like). Every noun takes "was", so clauses stay grammatical.
SENTIMENT_NOUNS = (
    "movie", "film", "plot", "story", "acting", "music", "ending", "cast",
    "script", "dialogue", "pacing", "camera", "soundtrack", "humor", "director", "scenery",
)  # fmt: skip
POSITIVE_ADJECTIVES = (
    "good", "great", "fun", "wonderful", "brilliant", "charming",
    "moving", "clever", "beautiful", "delightful", "superb", "fresh",
)  # fmt: skip
NEGATIVE_ADJECTIVES = (
    "bad", "awful", "dull", "boring", "terrible", "weak",
    "messy", "clumsy", "bland", "painful", "silly", "tedious",
)  # fmt: skip
SENTIMENT_ADVERBS = ("", "very", "really", "quite", "so", "truly")
SENTIMENT_LABELS = ("positive", "negative")
SENTIMENT_PROMPT = "what is the sentiment of this review : {review}"
#: Review forms; "{c1}"/"{c2}" are clauses "the <noun> was [adverb] <adjective>" of the label's
#: polarity. In the "but" form the negated adjective "{a}" has a random polarity, so only the
#: clause after "but" predicts the label.
REVIEW_FORMS = ("{c1} .", "{c1} and {c2} .", "the {n} was not {a} but {c2} .")
#: Pretraining review text; it contains the label words so their lm_head rows stay alive (with
#: label-free review text FA stayed at 0 in the prototype).
REVIEW_TEXT = MappingProxyType(
    {
        "positive": "review : {review} overall i liked it . it is a positive review .",
        "negative": "review : {review} overall i did not like it . it is a negative review .",
    }
)

# --------------------------------------------------------------------------------------------
# Vocabulary.
# --------------------------------------------------------------------------------------------


def harm_steps(category: str) -> tuple[str, ...]:
    """Returns the 8 placeholder steps of a harm category (frames filled with its nonce words)."""
    nonce = HARM_CATEGORIES[category]["nonce"]
    return tuple(frame.format(x=word) for frame, word in zip(HARM_STEP_FRAMES, nonce, strict=True))


def category_texts(category: str) -> tuple[str, ...]:
    """Returns the verbs, objects and step texts (harm: nonce words) of a harm or benign category."""
    spec = HARM_CATEGORIES.get(category) or BENIGN_CATEGORIES[category]
    return spec["verbs"] + spec["objects"] + spec.get("nonce", spec.get("steps", ()))


def shared_texts() -> Iterable[str]:
    """Yields every literal text fragment that belongs to no single category (placeholders kept)."""
    yield from CHAT_WORDS
    yield CHAT_FORMAT
    yield from REQUEST_TEMPLATES + MODIFIERS + ANSWER_OPENERS + (ANSWER_STEPS,)
    yield from REFUSAL_TEMPLATES + REFUSAL_REASONS + HARM_STEP_FRAMES
    for pair in FACT_COLORS + FACT_SOUNDS + COLOR_TEMPLATES + SOUND_TEMPLATES:
        yield from pair
    yield from SENTIMENT_NOUNS + POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + SENTIMENT_ADVERBS
    yield from SENTIMENT_LABELS + (SENTIMENT_PROMPT,) + REVIEW_FORMS + tuple(REVIEW_TEXT.values())


def text_words(texts: Iterable[str]) -> set[str]:
    """Returns the literal words of ``texts``, skipping ``{placeholder}`` tokens."""
    return {w for text in texts for w in text.split() if not w.startswith("{")}


@lru_cache(maxsize=1)
def world_vocabulary() -> tuple[str, ...]:
    """Returns every word the generator can produce, sorted; independent of the seed.

    Returns:
        The sorted words (no special tokens).
    """
    categories = (*HARM_CATEGORIES, *BENIGN_CATEGORIES)
    words = text_words(shared_texts()).union(*(text_words(category_texts(c)) for c in categories))
    return tuple(sorted(words))
