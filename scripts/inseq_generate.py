"""Attributes every generated token of an answer with inseq 0.7 (method ``input_x_gradient``),
the second peer of relfast's ``Explainer.generate`` in benchmarks/bench_generate.py. Runs in
captum's side environment (inseq 0.7.1 is installed there beside captum 0.9, torch 2.13 CPU and
transformers; scripts/make_captum_env.sh), never in relfast's: it does not import relfast.

The same input file, protocol and memory measurement as scripts/captum_generate.py (whose
helpers it uses). What an inseq user does for generated answers (constrained attribution of
given texts), one call for all samples:

    model = inseq.load_model(gpt2_model, "input_x_gradient", tokenizer=tokenizer)
    model.attribute(prompt_texts, prompt_plus_answer_texts, attributed_fn="probability",
                    logprob=True, show_progress=False)

inseq 0.7.1 runs constrained attribution of a decoder-only model one sample at a time ("Batched
constrained decoding is currently not supported for decoder-only models. Using batch size of 1."),
and for each generated token one forward over the prefix and one backward of the token's
log-probability (``logprob=True``: the target captum uses; inseq's default is the probability),
gradient x input at the input embeddings, kept for the prefix (prompt and earlier generated
tokens) and every width. The matrices returned for the benchmark's check: its (T, P_b) prompt
columns, summed over the width, the same quantity as captum's.

The stand-in tokenizer (captum_generate.word_level_tokenizer) gets ``t0`` as pad and bos token
and the model's config pad/bos id 0 (the benchmark generates with pad id 0): inseq 0.7.1 reads
both at load time and fails on ``None`` (``convert_ids_to_tokens(None)``); neither enters the
forward of a constrained attribution of unpadded samples.

    /work/captum-env/bin/python scripts/inseq_generate.py --case CASE.pt --rounds 1 --out ATTR.pt
    /work/captum-env/bin/python scripts/inseq_generate.py --case CASE.pt --serve
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import captum_generate  # noqa: E402
from captum_generate import text_of, word_level_tokenizer  # noqa: E402


class InseqRunner:
    """One run = inseq's attribution of every sample's answer (one ``attribute`` call)."""

    name = "inseq"
    packages = ("inseq", "captum", "torch", "transformers")

    def __init__(self, model, samples):
        import inseq

        tokenizer = word_level_tokenizer(model.config.vocab_size)
        tokenizer.pad_token = tokenizer.bos_token = "t0"
        for key in ("pad_token_id", "bos_token_id"):
            if getattr(model.config, key, None) is None:
                setattr(model.config, key, 0)
        self.samples = samples
        self.prompts = [text_of(prompt) for prompt, _ in samples]
        self.answers = [text_of(torch.cat([prompt, answer])) for prompt, answer in samples]
        for text, (prompt, answer) in zip(self.answers, samples):
            if not torch.equal(torch.tensor(tokenizer.encode(text)), torch.cat([prompt, answer])):
                raise RuntimeError("inseq_generate.py: the stand-in tokenizer does not round-trip the sequence")
        self.model = inseq.load_model(model, "input_x_gradient", tokenizer=tokenizer)
        self.last = None

    def warm_up(self):
        """A small attribution (the first sample's first prompt tokens, two answer tokens), as in
        captum_generate.CaptumRunner.warm_up."""
        prompt, answer = self.samples[0]
        self.model.attribute([text_of(prompt[:4])], [text_of(torch.cat([prompt[:4], answer[:2]]))],
                             attributed_fn="probability", logprob=True, show_progress=False)

    def __call__(self):
        self.last = self.model.attribute(self.prompts, self.answers, attributed_fn="probability", logprob=True,
                                         show_progress=False)
        return self.last

    def attributions(self):
        """The last run's (T, P_b) matrices: the prompt columns, summed over the width."""
        out = []
        for sequence, (prompt, answer) in zip(self.last.sequence_attributions, self.samples):
            rows = sequence.target_attributions.sum(-1)  # (P_b + T, T): prefix token x generated token
            if rows.shape != (prompt.numel() + answer.numel(), answer.numel()):
                raise RuntimeError(f"inseq_generate.py: unexpected attribution shape {tuple(rows.shape)}")
            out.append(rows[:prompt.numel()].T.float().contiguous())
        return out


if __name__ == "__main__":
    captum_generate.main(InseqRunner)
