"""Stage "captioner": the descriptive video captioner used to re-caption training data (DALL-E 3 / Sora).

What is specific to this stage (the loop owns everything else):
  model    Captioner(config.model) (sora_jax/models/captioner.py): pixel spacetime-patch
           video encoder + autoregressive text decoder over HashTokenizer ids
  batches  bucketed pixel batches (sora_jax/data/pipeline.pixel_batches) whose text_ids
           are the *descriptive* captions (config.data.caption = "descriptive")
  loss     teacher-forced cross-entropy on the caption ids (EOS included, padding and
           the pipeline's filler rows, index -1, left out)
  eval     loss and token accuracy on held-out batches (inside jit); on_eval greedy-
           decodes config.captioner.num_examples held-out videos and scores them
           against the ground truth: fact recall (sora_jax.data.captions facts whose
           keywords appear in the decoded caption), per fact kind, and exact match.
           Decoded vs reference captions go to workdir/captions/step_N.jsonl.
  vocab    workdir/vocab.json: the id -> word table (the hashing tokenizer has no
           inverse), built from the caption grammar plus the words of the training
           captions; recaption.py reads it back.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sora_jax.data.tokenizer import EOS_ID, PAD_ID, HashTokenizer
from sora_jax.train.stage import Stage

VOCAB_FILE = "vocab.json"
UNKNOWN_WORD = "<unk>"


# --- vocabulary: ids back to words ------------------------------------------------------


def build_vocabulary(data_config, captions_iter: Iterable[str] = ()) -> dict:
    """The id -> word table: the toy caption grammar plus the pieces of `captions_iter`.

    When two words share a hash id, the one seen most often in the captions wins
    (grammar words count once); the losers are listed under "collisions".
    """
    from sora_jax.data import captions

    tokenizer = HashTokenizer(int(data_config.vocab_size), int(data_config.text_len))
    counts: collections.Counter = collections.Counter({w: 1 for w in captions.caption_vocabulary()})
    scanned = 0
    for text in captions_iter:
        counts.update(tokenizer.pieces(text))
        scanned += 1
    by_id: dict[int, list[str]] = {}
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        by_id.setdefault(tokenizer.piece_id(word), []).append(word)
    return {
        "tokenizer": "hash", "vocab_size": tokenizer.vocab_size, "text_len": tokenizer.max_len,
        "captions_scanned": scanned,
        "words": {str(i): ws[0] for i, ws in sorted(by_id.items())},
        "collisions": {str(i): ws for i, ws in sorted(by_id.items()) if len(ws) > 1},
    }


def training_captions(data_config, limit: int) -> Iterable[str]:
    """Descriptive captions of the first `limit` training records (none for the toy world:
    its captions come from the grammar, which caption_vocabulary() lists in full)."""
    if data_config.source == "toy" or limit <= 0:
        return
    from sora_jax.data import sources, transforms

    source = sources.make_source(data_config, "train")
    for i in range(min(limit, len(source))):
        yield transforms.caption_of(source[i], data_config)


def write_vocabulary(vocab: Mapping, workdir: str) -> str:
    from sora_jax import jsonio

    return jsonio.write_json(os.path.join(workdir, VOCAB_FILE), vocab, indent=0)


def read_vocabulary(workdir: str) -> dict:
    path = os.path.join(workdir, VOCAB_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the captioner stage writes it at its first eval and at the end")
    with open(path) as f:
        vocab = json.load(f)
    if vocab.get("tokenizer") != "hash" or "words" not in vocab:
        raise ValueError(f"{path}: not a captioner vocabulary (needs tokenizer 'hash' and 'words')")
    return vocab


def id_to_word(vocab: Mapping) -> dict[int, str]:
    return {int(i): w for i, w in vocab["words"].items()}


def allowed_ids(vocab: Mapping) -> np.ndarray:
    """bool [vocab_size]: the ids the table can spell, plus EOS."""
    mask = np.zeros((int(vocab["vocab_size"]),), bool)
    mask[[int(i) for i in vocab["words"]]] = True
    mask[EOS_ID] = True
    return mask


_ATTACH_LEFT = {".", ",", ";", ":", "!", "?", ")"}


def detokenize(ids: Sequence[int], table: Mapping[int, str]) -> str:
    """ids -> text up to the first EOS: punctuation attached, '-' joins words, sentences capitalised."""
    out = ""
    joiner = False
    for i in (int(x) for x in ids):
        if i == EOS_ID:
            break
        if i == PAD_ID:
            continue
        word = table.get(i, UNKNOWN_WORD)
        if word == "-":
            out, joiner = out + "-", True
            continue
        out += word if (not out or joiner or word in _ATTACH_LEFT) else " " + word
        joiner = False
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), out)


# --- greedy captioning, shared by on_eval and recaption.py -----------------------------------


class CaptionWriter:
    """Greedy-decodes videos in batches of one shape; one compiled decoder per (T, H, W).

    Batches are padded (by repeating their last video) to `batch_size`, a multiple of
    the devices, so every shape compiles once and splits over the data axis.
    """

    def __init__(self, model: nnx.Module, vocab: Mapping, batch_size: int = 8, max_len: int | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.table = id_to_word(vocab)
        self.allowed = jnp.asarray(allowed_ids(vocab))
        self.max_len = int(max_len or model.max_len)
        multiple = jax.device_count()
        self.batch_size = max(multiple, -(-int(batch_size) // multiple) * multiple)
        graphdef, max_len_ = self.graphdef, self.max_len

        @jax.jit
        def decode(state, video, allowed):
            return nnx.merge(graphdef, state).decode_greedy(video, max_len_, allowed)

        self._decode = decode

    def ids(self, videos: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Caption ids of videos (each (T, H, W, 3) float in [-1, 1]), in input order."""
        groups: dict[tuple, list[int]] = {}
        for i, v in enumerate(videos):
            groups.setdefault(tuple(v.shape), []).append(i)
        out: list[Any] = [None] * len(videos)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = np.stack([videos[i] for i in chunk] + [videos[chunk[-1]]] * (self.batch_size - len(chunk)))
                ids = np.asarray(self._decode(self.state, jnp.asarray(batch, jnp.float32), self.allowed))
                for row, i in enumerate(chunk):
                    out[i] = ids[row]
        return out

    def captions(self, videos: Sequence[np.ndarray]) -> list[str]:
        return [detokenize(ids, self.table) for ids in self.ids(videos)]


# --- scoring against the ground truth ---------------------------------------------------------


def score_caption(caption: str, ground_truth: Mapping | None, reference: str) -> dict:
    """Fact recall of one decoded caption (when there is ground truth) and exact match."""
    out: dict[str, Any] = {"exact_match": float(caption.strip().lower() == reference.strip().lower())}
    if ground_truth:
        from sora_jax.data import captions

        facts = captions.caption_facts(ground_truth)
        missing = captions.missing_facts(caption, facts)
        kinds = collections.Counter(f[0] for f in facts)
        missed = collections.Counter(f[0] for f in missing)
        out.update(facts=len(facts), missing=[list(f) for f in sorted(missing, key=str)],
                   fact_recall=1.0 - len(missing) / max(len(facts), 1),
                   per_kind={k: (n - missed[k], n) for k, n in kinds.items()})
    return out


def summarise(scores: Sequence[dict]) -> dict[str, float]:
    """Mean exact match; fact recall pooled over all facts and per fact kind."""
    out = {"captions/exact_match": float(np.mean([s["exact_match"] for s in scores])) if scores else 0.0}
    with_facts = [s for s in scores if "facts" in s]
    if with_facts:
        total = sum(s["facts"] for s in with_facts)
        out["captions/fact_recall"] = sum(s["facts"] - len(s["missing"]) for s in with_facts) / max(total, 1)
        per_kind: dict[str, list[int]] = {}
        for s in with_facts:
            for kind, (hit, n) in s["per_kind"].items():
                acc = per_kind.setdefault(kind, [0, 0])
                acc[0] += hit
                acc[1] += n
        out.update({f"captions/recall_{k}": hit / n for k, (hit, n) in sorted(per_kind.items())})
    return out


# --- the stage ---------------------------------------------------------------------------------


class CaptionerStage(Stage):
    name = "captioner"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        data, model = config.data, config.model
        if data.caption != "descriptive":
            raise ValueError(f"config.data.caption is {data.caption!r}: the captioner learns the descriptive "
                             "captions (set config.data.caption='descriptive')")
        if int(model.vocab_size) != int(data.vocab_size):
            raise ValueError(f"config.model.vocab_size {model.vocab_size} != config.data.vocab_size {data.vocab_size}")
        if int(model.max_len) < int(data.text_len):
            raise ValueError(f"config.model.max_len {model.max_len} < config.data.text_len {data.text_len}")
        self._vocab = None
        self._examples = None
        self._writer_cache = None

    # --- model --------------------------------------------------------------------------
    def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
        from sora_jax.models.captioner import Captioner

        return Captioner(self.config.model, rngs=rngs)

    # --- data -----------------------------------------------------------------------------
    def train_batches(self, process_index: int, process_count: int) -> Any:
        from sora_jax.data import pipeline

        return self.pipeline_batches(pipeline.pixel_batches, "train", process_index, process_count)

    def eval_batches(self):
        from sora_jax.data import pipeline

        return self.fixed_eval_batches(pipeline.pixel_batches)

    # --- objective --------------------------------------------------------------------------
    def _token_terms(self, model, batch):
        from sora_jax.models.captioner import teacher_forcing_inputs

        ids = batch["text_ids"].astype(jnp.int32)
        logits = model(batch["video"], teacher_forcing_inputs(ids))
        # Real caption tokens (EOS included) of real rows: filler rows repeat an example.
        mask = ((ids != PAD_ID) & (batch["index"] >= 0)[:, None]).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
        correct = (jnp.argmax(logits, -1) == ids).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(mask), 1.0)
        return jnp.sum(ce * mask) / n, jnp.sum(correct * mask) / n, jnp.sum(mask)

    def loss(self, model, batch, key):
        loss, accuracy, tokens = self._token_terms(model, batch)
        return loss, {"token_accuracy": accuracy, "caption_tokens": tokens}

    def eval_metrics(self, model, batch, key):
        # Both are means over caption tokens, so the loop weights batches by their tokens. The
        # perplexity is exp(eval/loss): a mean of per-batch exp(loss) would not be one.
        loss, accuracy, tokens = self._token_terms(model, batch)
        return {"loss": loss, "token_accuracy": accuracy, "count": tokens}

    # --- accounting ---------------------------------------------------------------------------
    def tokens_in_batch(self, batch) -> int:
        """Caption tokens trained on (EOS included)."""
        return int(np.sum((np.asarray(batch["text_ids"]) != PAD_ID) & (np.asarray(batch["index"]) >= 0)[:, None]))

    def train_flops_per_batch(self, batch) -> float:
        """Analytic: 3 x forward (2 FLOPs per multiply-add), matmuls and attention scores."""
        m = self.config.model
        b, t, h, w, _ = np.shape(batch["video"])
        pt, ph, pw = m.patch
        n = -(-t // pt) * (h // ph) * (w // pw)
        s = np.shape(batch["text_ids"])[1]
        d, f, v = int(m.width), int(m.mlp_dim), int(m.vocab_size)
        enc = n * (pt * ph * pw * 3 * d) + int(m.encoder_depth) * (n * (4 * d * d + 2 * d * f) + 2 * n * n * d)
        dec = int(m.decoder_depth) * (s * (6 * d * d + 2 * d * f) + n * 2 * d * d + 2 * s * s * d + 2 * s * n * d)
        return float(3 * 2 * b * (enc + dec + s * d * v))

    # --- vocabulary and side outputs ------------------------------------------------------------
    def vocabulary(self) -> dict:
        if self._vocab is None:
            scan = int(self.config.get("captioner", {}).get("vocab_scan", 4096))
            self._vocab = build_vocabulary(self.config.data, training_captions(self.config.data, scan))
        return self._vocab

    def _caption_examples(self) -> list[dict]:
        """The held-out records captioned at every eval (fixed): clips, then extra images.

        First the first `captioner.num_examples` records of the eval split, as the data mix
        has them (quick: 10% images, so 4 of 32). Then `captioner.num_images` more held-out
        images, so that media recall (is it an image?) rests on more than a handful: on the
        toy world, the eval split's later records rendered with `image_prob=1` (new scenes,
        still held out: the split's indices are never trained on); on other sources, the
        split's later 1-frame records, as many as there are.
        """
        if self._examples is None:
            from sora_jax.data import sources, transforms

            data = self.config.data
            settings = self.config.get("captioner", {})
            source = sources.make_source(data, "eval")
            transform = transforms.VideoTransform(data, train=False)

            def example(record, group):
                return dict(index=int(record["index"]), group=group, video=transform(record)["video"],
                            reference=transforms.caption_of(record, data), ground_truth=sources.ground_truth(record))

            count = min(int(settings.get("num_examples", 16)), len(source))
            self._examples = [example(source[i], "mix") for i in range(count)]
            wanted = int(settings.get("num_images", 0))
            if wanted:
                image_source = source
                if data.source == "toy":
                    images_only = data.copy_and_resolve_references()
                    images_only.toy.image_prob = 1.0
                    image_source = sources.make_source(images_only, "eval")
                images = []
                for i in range(count, len(image_source)):
                    if len(images) == wanted:
                        break
                    record = image_source[i]
                    if np.shape(record["video"])[0] == 1:
                        images.append(example(record, "images"))
                if len(images) < wanted:
                    print(f"[captioner] captioner.num_images={wanted}: the eval split has only {len(images)} "
                          f"images after its first {count} records; captioning those", flush=True)
                self._examples += images
        return self._examples

    def on_eval(self, model, workdir: str, step: int, writer: Any) -> None:
        log = getattr(writer, "log", print)
        vocab = self.vocabulary()
        write_vocabulary(vocab, workdir)
        examples = self._caption_examples()
        if not examples:
            return
        graphdef, state = nnx.split(model)
        if self._writer_cache is None or self._writer_cache.graphdef != graphdef:  # compile once per run
            self._writer_cache = CaptionWriter(model, vocab, max_len=int(self.config.data.text_len),
                                               batch_size=int(self.config.get("captioner", {}).get("batch_size", 8)))
        captioner = self._writer_cache
        captioner.state = state
        decoded = captioner.captions([e["video"] for e in examples])
        scores = [score_caption(c, e["ground_truth"], e["reference"]) for c, e in zip(decoded, examples)]
        out_dir = os.path.join(workdir, "captions")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"step_{step}.jsonl")
        with open(path, "w") as f:
            for e, c, s in zip(examples, decoded, scores):
                row = {"index": e["index"], "set": e["group"], "shape": list(e["video"].shape[:3]), "caption": c,
                       "reference": e["reference"], **{k: v for k, v in s.items() if k != "per_kind"}}
                f.write(json.dumps(row) + "\n")
        # The mix's figures stay comparable across configs; the extra images get their own.
        summary = summarise([s for s, e in zip(scores, examples) if e["group"] == "mix"])
        images = [s for s, e in zip(scores, examples) if e["group"] == "images"]
        if images:
            summary.update({k.replace("captions/", "captions/images/"): v for k, v in summarise(images).items()})
        if hasattr(writer, "write"):
            writer.write(step, summary)
        log(f"captioner step {step}: " + ", ".join(f"{k.removeprefix('captions/')} {v:.3f}" for k, v in summary.items())
            + f"; captions in {path}\n  e.g. {decoded[0]!r}")

    def on_finish(self, model, workdir: str) -> None:
        if jax.process_index() == 0:
            write_vocabulary(self.vocabulary(), workdir)
