"""Randomized differential test against PEFT: the same options through ``peft.get_peft_model`` and ``inject_lora``.

Each case is derived from its seed alone (``case_of``; the module names it picks come from a second generator seeded
by the same seed), so a failure reproduces by its id, e.g. ``s07-gpt2-lm-regex-rsLoRA``:
  * a tiny LLaMA, GPT-2, BERT, T5 or OPT built from a ``transformers`` config (hidden 16-32, 1-2 layers, vocab <= 64,
    nothing downloaded; GPT-2, BERT's MLM head, T5 and OPT with the head tied to the embeddings, LLaMA either way),
    with its LM head or its classification head;
  * targets as a list (full names and dotted suffixes), leaf suffixes, a regex or "all-linear", drawn from the
    model's own nn.Linear / Conv1D names so that at least one module is adapted; exclude_modules, rank_pattern and
    alpha_pattern keyed by real module-name suffixes (or a layer index); modules_to_save = the architecture's head;
    use_rslora, r in {1, 2, 4}, lora_alpha, lora_dropout (the models run in eval mode, so dropout is moot);
  * our mode "AB", or "B" (ours trains only B; PEFT's lora_A is frozen by hand: forward and B's gradient compared).

Both libraries get the same random non-zero factors (PEFT's, filled with randn, copied into ours) and the same
perturbed saved-module copies; then, for each case:
  (a) the adapted module names, and per layer r, scaling and fan_in_fan_out;
  (b) the trainable parameters: the same names (PEFT's ``...lora_A.default.weight`` / ``...modules_to_save.default.*``
      mapped to ours) and our ``trainable_parameters`` = PEFT's ``get_nb_trainable_parameters`` (the totals too, up
      to the untied originals of saved modules, which PEFT keeps and we drop: ``dropped_originals``);
  (c) logits (fp32, eval mode) on random input ids;
  (d) the gradients of sum(logits²) w.r.t. every trainable LoRA factor and saved-module parameter;
  (e) ``merge_lora`` against PEFT's ``merge_and_unload``;
  (f) adapter files both ways: our ``save_adapter`` loaded by ``PeftModel.from_pretrained`` into a fresh base, and
      PEFT's ``save_pretrained`` loaded by our ``load_adapter`` into a fresh base (adapted set, ranks, logits).
Outputs are compared with ``assert_matches_reference`` against a float64 copy of the PEFT model: relative error of
ours <= 2 x PEFT's own fp32 error + ``error_floor(float32, k)`` (k: ``reduction_length``).

Only the PyTorch path runs here (``lora_kernels.ops.lora_linear.dispatch.use_triton`` forced False, also under
TRITON_INTERPRET=1, which CI sets): this test checks model-level semantics (matching, patterns, scaling, saved
modules, files, merge) against PEFT, and the interpreted kernels would make it minutes long; the kernels are
checked against the same reference op by op in tests/ops, and at model level against PEFT in test_peft_parity.py /
test_patch_peft.py (``backend`` fixture).

PEFT behaviours this test works around, each with its reason at the spot: get_peft_model leaves its new LoRA layers in
train mode (``.eval()``); PEFT writes adapter_config.json with sorted keys, which can reorder overlapping
rank_pattern / alpha_pattern keys (PEFT's own reload is the reference for its file).
"""

import copy
import dataclasses
import random
import re
import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_kernels import (inject_lora, load_adapter, merge_lora, named_lora_layers, save_adapter,  # noqa: E402
                          trainable_parameters)
from lora_kernels.ops.lora_linear import dispatch  # noqa: E402
from tests.helpers import assert_matches_reference  # noqa: E402

Conv1D = transformers.pytorch_utils.Conv1D
PEFT_PREFIX = "base_model.model."
ARCHS = ("llama", "gpt2", "bert", "t5", "opt")
KINDS = ("list", "suffix", "regex", "all-linear")
SEEDS = range(40)  # seed % 5 picks the architecture, seed % 4 the kind of targets: all 20 pairs occur
BATCH, SEQ = 2, 7
# The head each architecture can put in modules_to_save, by head kind ("lm": tied to the embeddings except LLaMA
# untied; "cls": a sequence classifier).  T5 has only its LM head here.
HEADS = {("llama", "lm"): "lm_head", ("llama", "cls"): "score", ("gpt2", "lm"): "lm_head", ("gpt2", "cls"): "score",
         ("bert", "lm"): "decoder", ("bert", "cls"): "classifier", ("t5", "lm"): "lm_head",
         ("opt", "lm"): "lm_head", ("opt", "cls"): "score"}


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)


# ------------------------------------------------------------------------------------------------------------
# Cases: everything but the module names, from the seed
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    arch: str
    head: str  # "lm" or "cls"
    kind: str  # KINDS
    hidden: int
    layers: int
    heads: int
    vocab: int
    tied: bool  # LLaMA's LM head (the others are as their architecture has it)
    proj: bool  # OPT with word_embed_proj_dim = hidden / 2: project_in / project_out nn.Linear layers
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    mode: str
    rank_pattern: bool
    alpha_pattern: bool
    exclude: bool
    save_head: bool

    @property
    def id(self) -> str:
        flags = [("rsLoRA", self.use_rslora), ("B", self.mode == "B"), ("rank", self.rank_pattern),
                 ("alpha", self.alpha_pattern), ("excl", self.exclude), ("save", self.save_head),
                 ("tied", self.tied), ("proj", self.proj)]
        return "-".join([f"s{self.seed:02d}", self.arch, self.head, self.kind] + [f for f, on in flags if on])

    @property
    def ffn(self) -> int:
        return 2 * self.hidden


def case_of(seed: int) -> Case:
    rng = random.Random(seed)
    arch, kind = ARCHS[seed % len(ARCHS)], KINDS[seed % len(KINDS)]
    head = "lm" if arch == "t5" else rng.choice(["lm", "cls"])
    return Case(seed=seed, arch=arch, head=head, kind=kind, hidden=rng.choice([16, 32]), layers=rng.choice([1, 2]),
                heads=rng.choice([2, 4]), vocab=rng.choice([48, 64]),
                tied=arch == "llama" and head == "lm" and rng.random() < 0.5,
                proj=arch == "opt" and rng.random() < 0.4, r=rng.choice([1, 2, 4]),
                lora_alpha=rng.choice([1, 2, 4, 8, 16, 3.5]), lora_dropout=rng.choice([0.0, 0.0, 0.1]),
                use_rslora=rng.random() < 0.4, mode=rng.choice(["AB", "AB", "B"]),
                rank_pattern=rng.random() < 0.4, alpha_pattern=rng.random() < 0.4, exclude=rng.random() < 0.35,
                save_head=rng.random() < 0.4)


CASES = [case_of(s) for s in SEEDS]


def build(case: Case) -> nn.Module:
    """The base model of ``case``, freshly built from its config with the case's seed (same seed, same weights)."""
    h, n, heads, v = case.hidden, case.layers, case.heads, case.vocab
    if case.arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=case.ffn, num_hidden_layers=n,
                                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                                       max_position_embeddings=32, tie_word_embeddings=case.tied, pad_token_id=0)
        cls = transformers.LlamaForCausalLM if case.head == "lm" else transformers.LlamaForSequenceClassification
    elif case.arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=n, n_embd=h, n_head=heads, vocab_size=v, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
        cls = transformers.GPT2LMHeadModel if case.head == "lm" else transformers.GPT2ForSequenceClassification
    elif case.arch == "bert":
        cfg = transformers.BertConfig(vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                                      intermediate_size=case.ffn, max_position_embeddings=32, pad_token_id=0)
        cls = transformers.BertForMaskedLM if case.head == "lm" else transformers.BertForSequenceClassification
    elif case.arch == "t5":
        cfg = transformers.T5Config(vocab_size=v, d_model=h, d_kv=h // heads, d_ff=case.ffn, num_layers=n,
                                    num_heads=heads, relative_attention_num_buckets=8, pad_token_id=0,
                                    eos_token_id=1)
        cls = transformers.T5ForConditionalGeneration
    else:
        cfg = transformers.OPTConfig(vocab_size=v, hidden_size=h, ffn_dim=case.ffn, num_hidden_layers=n,
                                     num_attention_heads=heads, max_position_embeddings=32, pad_token_id=1,
                                     word_embed_proj_dim=h // 2 if case.proj else h)
        cls = transformers.OPTForCausalLM if case.head == "lm" else transformers.OPTForSequenceClassification
    torch.manual_seed(case.seed)
    return cls(cfg).eval()


def inputs(case: Case) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    ids = torch.randint(3, case.vocab, (BATCH, SEQ), generator=g)  # no pad / bos / eos ids
    if case.arch == "t5":
        return dict(input_ids=ids, decoder_input_ids=torch.randint(3, case.vocab, (BATCH, SEQ - 2), generator=g))
    return dict(input_ids=ids)


def reduction_length(case: Case) -> int:
    """k for ``error_floor``: a generous sum of the fp32 reduction lengths along the model's path.  Each logit (and
    each gradient) is a chain of fp32-accumulated reductions whose random-walk errors add in variance, so the error
    relative to fp64 is ~ eps·√(sum of the lengths).  Per block: 4·hidden for the q/k/v/o projections (the head dims
    and the adapter's r are shorter, and are covered by it), 2·ffn for the MLP's up and down projections, 2·tokens for
    softmax·V and the gradients' reductions over the batch·sequence tokens; plus hidden + vocab for the head and the
    loss.  T5 counts 3 blocks per layer (encoder, decoder self- and cross-attention)."""
    blocks = case.layers * (3 if case.arch == "t5" else 1)
    return blocks * (4 * case.hidden + 2 * case.ffn + 2 * BATCH * SEQ) + case.hidden + case.vocab


# ------------------------------------------------------------------------------------------------------------
# The options, with names drawn from the model's own modules
# ------------------------------------------------------------------------------------------------------------

def linear_names(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D)]


def _output_head(model):
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if head is not None and m is head), None)


def _in(name, targets):
    """PEFT's matching (and ours): a regex string must match the whole name; a list entry must equal the name or be
    a dotted suffix of it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def valid_suffixes(model, names, depth=2):
    """The 1- and 2-component suffixes of ``names`` that select only nn.Linear / Conv1D modules of ``model`` (a PEFT
    target naming a LayerNorm or an attention block would be refused or adapted as another layer type)."""
    linear = set(linear_names(model))
    every = [n for n, _ in model.named_modules() if n]
    out = set()
    for n in names:
        parts = n.split(".")
        for k in range(1, min(depth, len(parts)) + 1):
            s = ".".join(parts[-k:])
            if all(m in linear for m in every if _in(m, [s])):
                out.add(s)
    return sorted(out)


def expected_adapted(model, opts):
    """The modules both libraries should adapt: only used to draw valid options (at least one adapted module), the
    test itself compares ours with PEFT."""
    linear = linear_names(model)
    targets = opts["target_modules"]
    if targets == "all-linear":
        chosen = [n for n in linear if n != _output_head(model)]
    else:
        chosen = [n for n in linear if _in(n, targets)]
    if opts.get("exclude_modules"):
        chosen = [n for n in chosen if not _in(n, opts["exclude_modules"])]
    saved = opts.get("modules_to_save") or []
    return [n for n in chosen if not any(n == s or n.endswith("." + s) or n.startswith(s + ".") for s in saved)]


def _draw_targets(case, model, rng):
    linear = linear_names(model)
    leaves = valid_suffixes(model, linear, depth=1)
    if case.kind == "all-linear":
        return "all-linear"
    if case.kind == "suffix":
        return rng.sample(leaves, rng.randint(1, min(3, len(leaves))))
    if case.kind == "list":
        chosen = rng.sample(linear, rng.randint(1, min(4, len(linear))))
        dotted = [s for s in valid_suffixes(model, linear) if "." in s]
        return chosen + ([rng.choice(dotted)] if dotted and rng.random() < 0.5 else [])
    alt = "|".join(re.escape(s) for s in rng.sample(leaves, rng.randint(1, min(3, len(leaves)))))
    form = rng.randrange(3)
    if form == 0:
        return rf"(?:.*\.)?(?:{alt})"
    if form == 1:
        return rf".*\.(?:{alt})"
    return rf".*\.{rng.randrange(case.layers)}\..*\.(?:{alt})"


def _draw_exclude(model, adapted, rng):
    victim = rng.choice(adapted)
    form = rng.randrange(3)
    if form == 0:
        return [victim]
    if form == 1:
        return re.escape(victim)
    return [rng.choice(valid_suffixes(model, [victim]))]


def _draw_pattern(case, adapted, values, rng):
    """{key: value} with 1-2 keys: a 1- or 2-component suffix of an adapted module (its dot as written, i.e. a regex
    wildcard, or escaped), or a layer index; overlapping keys are kept, PEFT's first match decides."""
    keys = sorted({".".join(n.split(".")[-k:]) for n in adapted for k in (1, 2) if len(n.split(".")) >= k})
    pattern = {}
    for _ in range(rng.randint(1, 2)):
        form = rng.randrange(3)
        if form == 0:
            key = rng.choice(keys)
        elif form == 1:
            key = re.escape(rng.choice(keys))
        else:
            key = rf"{rng.randrange(case.layers)}\..*"  # every module under a layer index
        pattern[key] = rng.choice(values)
    return pattern


def options(case: Case, model) -> dict:
    """PEFT LoraConfig keywords of ``case`` (ours take the same ones), names drawn from ``model``'s modules by a
    generator seeded with the case's seed; redrawn until at least one module (two when some are excluded) is
    adapted."""
    rng = random.Random(10_000 + case.seed)
    for _ in range(200):
        opts = dict(target_modules=_draw_targets(case, model, rng), r=case.r, lora_alpha=case.lora_alpha,
                    lora_dropout=case.lora_dropout, use_rslora=case.use_rslora)
        if case.save_head:
            opts["modules_to_save"] = [HEADS[case.arch, case.head]]
        adapted = expected_adapted(model, opts)
        if len(adapted) < (2 if case.exclude else 1):
            continue
        if case.exclude:
            opts["exclude_modules"] = _draw_exclude(model, adapted, rng)
            adapted = expected_adapted(model, opts)
            if not adapted:
                continue
        if case.rank_pattern:
            opts["rank_pattern"] = _draw_pattern(case, adapted, [1, 2, 3, 5, 8], rng)
        if case.alpha_pattern:
            opts["alpha_pattern"] = _draw_pattern(case, adapted, [1, 3, 6.5, 16], rng)
        return opts
    raise AssertionError(f"{case.id}: no valid options drawn")


# ------------------------------------------------------------------------------------------------------------
# Reading both models in one vocabulary
# ------------------------------------------------------------------------------------------------------------

def peft_lora_layers(model):
    return {n[len(PEFT_PREFIX):]: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def peft_layer_summary(model):
    return {n: (m.r["default"], pytest.approx(m.scaling["default"], rel=1e-12), bool(m.fan_in_fan_out))
            for n, m in peft_lora_layers(model).items()}


def our_layer_summary(model):
    return {n: (m.r, m.scaling, m.fan_in_fan_out) for n, m in named_lora_layers(model)}


def peft_saved_copies(model):
    """{module name: PEFT's trainable copy} of each modules_to_save wrapper."""
    return {n[len(PEFT_PREFIX):]: m.modules_to_save["default"] for n, m in model.named_modules()
            if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}


def dropped_originals(model):
    """Size of the frozen originals of PEFT's saved modules that nothing else in the model holds: PEFT keeps them
    (``original_module``) and counts them in "all params"; our saved copy replaces the module, so an untied original
    (a classifier head) leaves the model, while a tied one (an LM head) stays reachable through the embeddings."""
    originals = {id(p): p for m in model.modules() if isinstance(m, peft.utils.other.ModulesToSaveWrapper)
                 for p in m.original_module.parameters()}
    elsewhere = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if ".original_module." not in n}
    return sum(p.numel() for i, p in originals.items() if i not in elsewhere)


def _canonical(peft_name):
    n = peft_name[len(PEFT_PREFIX):]
    n = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", n)
    return n.replace(".modules_to_save.default.", ".")


def peft_trainable(model):
    """{name in our vocabulary: parameter} of PEFT's trainable parameters: ``X.lora_A.default.weight`` is our
    ``X.lora_A``, ``S.modules_to_save.default.weight`` our saved copy's ``S.weight``."""
    return {_canonical(n): p for n, p in model.named_parameters() if p.requires_grad}


def our_trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def gradients(model, x, params):
    model.zero_grad(set_to_none=True)
    model(**x).logits.pow(2).sum().backward()
    return {n: p.grad for n, p in params.items()}


def quiet(fn, *args, **kwargs):
    """PEFT's and transformers' warnings (fan_in_fan_out flips, tied weights, unused exclude) are not under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def fill_like_peft(theirs, ours, case):
    """Random non-zero factors (B too) and perturbed saved copies in PEFT's model, copied into ours."""
    g = torch.Generator().manual_seed(case.seed)
    ours_layers = dict(named_lora_layers(ours))
    with torch.no_grad():
        for n, layer in peft_lora_layers(theirs).items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=g) * 0.3 / b.shape[1] ** 0.5)
            ours_layers[n].lora_A.copy_(a)
            ours_layers[n].lora_B.copy_(b)
        for n, copied in peft_saved_copies(theirs).items():
            mine = ours.get_submodule(n)
            for (pn, p), (qn, q) in zip(copied.named_parameters(), mine.named_parameters()):
                assert pn == qn, f"{n}: saved copies differ in structure ({pn} vs {qn})"
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
                q.copy_(p)


# ------------------------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------------------------

def test_cases_cover_the_space():
    """The seeds reach every architecture x kind of targets, both modes and every option."""
    assert {(c.arch, c.kind) for c in CASES} == {(a, k) for a in ARCHS for k in KINDS}
    for field in ("use_rslora", "rank_pattern", "alpha_pattern", "exclude", "save_head", "tied", "proj"):
        assert any(getattr(c, field) for c in CASES), field
    assert {c.mode for c in CASES} == {"AB", "B"} and {c.r for c in CASES} == {1, 2, 4}
    assert {(c.arch, c.head) for c in CASES} == set(HEADS)
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_differential_against_peft(case, tmp_path):
    opts = options(case, build(case))
    x, k = inputs(case), reduction_length(case)
    peft_cfg = peft.LoraConfig(**opts, fan_in_fan_out=case.arch == "gpt2")
    try:
        theirs = quiet(peft.get_peft_model, build(case), peft_cfg).eval()  # its new LoRA layers come in train mode
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError is a ValueError
        pytest.skip(f"PEFT refuses {opts}: {e}")
    ours = quiet(inject_lora, build(case), mode=case.mode, **opts)
    fill_like_peft(theirs, ours, case)
    if case.mode == "B":
        for layer in peft_lora_layers(theirs).values():
            layer.lora_A["default"].weight.requires_grad_(False)
    theirs64 = copy.deepcopy(theirs).double()

    # (a) the adapted modules, their ranks, scales and weight layouts
    assert our_layer_summary(ours) == peft_layer_summary(theirs), f"options {opts}"
    # (b) what trains: the same parameters, the same count
    ours_p, theirs_p, theirs64_p = our_trainable(ours), peft_trainable(theirs), peft_trainable(theirs64)
    assert sorted(ours_p) == sorted(theirs_p)
    counts = trainable_parameters(ours)
    assert (counts.trainable, counts.total + dropped_originals(theirs)) == theirs.get_nb_trainable_parameters()
    # (c) logits
    ref = (logits(theirs, x), logits(theirs64, x))
    assert_matches_reference(logits(ours, x), *ref, k, "logits")
    # (d) gradients of every trainable LoRA factor and saved copy (mode "B": B's only; A has none)
    got, same, ref64 = (gradients(m, x, p) for m, p in ((ours, ours_p), (theirs, theirs_p), (theirs64, theirs64_p)))
    for n in ours_p:
        assert_matches_reference(got[n], same[n], ref64[n], k, f"{n} grad")
    if case.mode == "B":
        assert all(m.lora_A.grad is None for _, m in named_lora_layers(ours))

    # (f) files both ways, into fresh bases
    save_adapter(ours, str(tmp_path / "ours"))
    into_peft = quiet(peft.PeftModel.from_pretrained, build(case), str(tmp_path / "ours"))
    assert peft_layer_summary(into_peft) == our_layer_summary(ours)
    assert_matches_reference(logits(into_peft, x), *ref, k, "our file in PEFT: logits")
    # PEFT's file: what PEFT itself reloads from it is the reference.  That can differ from ``theirs``: PEFT writes
    # adapter_config.json with sorted keys, so overlapping rank_pattern / alpha_pattern keys change order, and PEFT's
    # first-match rule then gives some layers another r / alpha (or ranks that disagree with the tensors, which PEFT
    # refuses on load: then ours must refuse the file too).  save_embedding_layers=False: with lm_head in the targets
    # PEFT's default also writes the head's base weight (covered by the test below).
    quiet(theirs.save_pretrained, str(tmp_path / "peft"), save_embedding_layers=False)
    try:
        peft_back = quiet(peft.PeftModel.from_pretrained, build(case), str(tmp_path / "peft")).eval()
    except (RuntimeError, ValueError) as e:
        with pytest.raises(ValueError, match=r"lora_A\.weight: shape .* in the file"):
            load_adapter(build(case), str(tmp_path / "peft"))
        assert "size mismatch" in str(e), e
    else:
        into_ours = quiet(load_adapter, build(case), str(tmp_path / "peft"))
        assert our_layer_summary(into_ours) == peft_layer_summary(peft_back)
        back_ref = (logits(peft_back, x), logits(copy.deepcopy(peft_back).double(), x))
        assert_matches_reference(logits(into_ours, x), *back_ref, k, "PEFT's file in ours: logits")

    # (e) merged
    merge_lora(ours)
    merged_ref = (logits(quiet(theirs.merge_and_unload), x), logits(quiet(theirs64.merge_and_unload), x))
    assert_matches_reference(logits(ours, x), *merged_ref, k, "merged logits")


# ------------------------------------------------------------------------------------------------------------
# A gap the differential test found, now closed: PEFT's default save also writes a targeted head's base weight
# ------------------------------------------------------------------------------------------------------------

def test_peft_file_with_embedding_layer_base_weights_loads(tmp_path):
    case = dataclasses.replace(next(c for c in CASES if c.arch == "llama"), head="lm", tied=False)
    theirs = quiet(peft.get_peft_model, build(case), peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=2))
    with torch.no_grad():
        for layer in peft_lora_layers(theirs).values():
            layer.lora_B["default"].weight.normal_(std=0.3)
    quiet(theirs.save_pretrained, str(tmp_path))  # PEFT's defaults
    back = quiet(peft.PeftModel.from_pretrained, build(case), str(tmp_path)).eval()
    ours = load_adapter(build(case), str(tmp_path))
    x = inputs(case)
    assert our_layer_summary(ours) == peft_layer_summary(back)
    assert_matches_reference(logits(ours, x), logits(back, x), logits(copy.deepcopy(back).double(), x),
                             reduction_length(case), "logits")
