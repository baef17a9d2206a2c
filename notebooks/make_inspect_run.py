"""Writes `inspect_run.ipynb` (kept as code here so the notebook stays reviewable; rerun after edits):

    python notebooks/make_inspect_run.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# Inspect a qthink run\n\n"
        "Points at a `qthink demo` work directory (set `QTHINK_RUN`, default `runs/demo`) and shows the training "
        "curves, the per-step cosine of the latents to their teachers, and a *logit lens* of each latent step "
        "(the top tokens its state decodes to through the LM head) next to the tokens at the teacher positions."
    ),
    new_code_cell(
        "import json\n"
        "import os\n"
        "from pathlib import Path\n\n"
        "import matplotlib.pyplot as plt\n"
        "import torch\n\n"
        "from qthink.demo.report import read_scalars  # also selects matplotlib's Agg backend (headless)\n\n"
        "RUN = Path(os.environ.get('QTHINK_RUN', 'runs/demo'))\n"
        "if not RUN.is_dir() and Path('..', RUN).is_dir():  # opened from notebooks/\n"
        "    RUN = Path('..', RUN)\n"
        "stages = json.loads((RUN / 'stages.json').read_text())\n"
        "fits = {k.removeprefix('fit-'): Path(v['result']['run_dir']) for k, v in stages.items() if k.startswith('fit-')}\n"
        "print(RUN, '| fits:', ', '.join(fits))"
    ),
    new_markdown_cell("## Training curves: answer cross-entropy and each latent step's L1"),
    new_code_cell(
        "scalars = {name: read_scalars(d / 'tensorboard') for name, d in fits.items()}\n"
        "fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))\n"
        "for name, s in scalars.items():\n"
        "    if 'train/ce' in s:\n"
        "        axes[0].plot(*zip(*s['train/ce'], strict=True), label=name)\n"
        "axes[0].set(title='answer CE', xlabel='step', yscale='log')\n"
        "axes[0].legend(fontsize=7)\n"
        "qt_s = scalars.get('qthink', {})\n"
        "for tag in sorted(t for t in qt_s if t.startswith('train/l1_step_')):\n"
        "    axes[1].plot(*zip(*qt_s[tag], strict=True), label=tag.rsplit('_', 1)[1])\n"
        "axes[1].set(title='qthink: L1 per latent step', xlabel='step')\n"
        "axes[1].legend(fontsize=7, title='k')\n"
        "fig.tight_layout()\n"
        "plt.show()"
    ),
    new_markdown_cell("## Cosine of each latent h_k to its teacher t_k (last logged value per step)"),
    new_code_cell(
        "cosines = {}\n"
        "for name, s in scalars.items():\n"
        "    tags = sorted((t for t in s if t.startswith('train/cos_step_')), key=lambda t: int(t.rsplit('_', 1)[1]))\n"
        "    if tags:\n"
        "        cosines[name] = [s[t][-1][1] for t in tags]\n"
        "for name, values in cosines.items():\n"
        "    print(f'{name:>14}: ' + '  '.join(f'k={k + 1}: {v:+.3f}' for k, v in enumerate(values)))\n"
        "assert cosines, 'no distilled fit logged cosines'"
    ),
    new_markdown_cell(
        "## Logit lens\n\nFor a few training problems: the top tokens each latent state of the trained QThink "
        "decodes to through the LM head, and the tokens at the teacher positions of the problem's first valid "
        "rollout (`linspace`: the seed's scheme; `steps`: reasoning-step boundaries)."
    ),
    new_code_cell(
        "from qthink.core.latent import think\n"
        "from qthink.core.model import QThink\n"
        "from qthink.core.sequences import encode_prompts, left_pad\n"
        "from qthink.teachers.extract import rollout_positions, special_ids, task_step_offsets\n\n"
        "problems = [json.loads(line) for line in (RUN / 'rollouts' / 'rollouts.jsonl').read_text().splitlines()[:3]]\n\n"
        "for name in ('qthink', 'qthink-steps'):  # the seed's K=6 linspace student and the steps student\n"
        "    if not (RUN / 'export' / name).is_dir():\n"
        "        continue\n"
        "    qt = QThink.from_pretrained(RUN / 'export' / name)\n"
        "    tok, lm_head = qt.tokenizer, qt.model.get_output_embeddings()\n"
        "    scheme = 'steps' if name.endswith('steps') else 'linspace'\n"
        "    print(f'== {name} (K={qt.latent_steps}, teacher positions: {scheme})')\n"
        "    show = lambda ids, tok=tok: ' '.join(repr(tok.decode([i])) for i in ids)  # noqa: E731\n"
        "    for p in problems:\n"
        "        batch = left_pad(encode_prompts(tok, [p['question']]), tok.pad_token_id)\n"
        "        with torch.inference_mode():\n"
        "            state = think(qt.model, qt.head, batch.input_ids, batch.attention_mask, qt.latent_steps)\n"
        "            top = lm_head(state.latents[0]).topk(3, -1).indices.tolist()\n"
        "        print('question:', p['question'])\n"
        "        for k, ids in enumerate(top):\n"
        "            print(f'  latent {k + 1}: top tokens {show(ids)}')\n"
        "        prompt = encode_prompts(tok, [p['question']], enable_thinking=True)[0]\n"
        "        for r in p['rollouts']:\n"
        "            status, ids, pos = rollout_positions(prompt, r['token_ids'], special_ids(tok), scheme, qt.latent_steps,\n"
        "                                                 tok, task_step_offsets('synthetic') if scheme == 'steps' else None)\n"
        "            if status == 'valid':\n"
        "                print(f'  teacher positions ({scheme}): {show([ids[i] for i in pos])}   in {r[\"text\"]!r}')\n"
        "                break\n"
        "        else:\n"
        "            print(f'  ({scheme}) no valid rollout for this problem')"
    ),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})
    nbformat.write(nb, Path(__file__).with_name("inspect_run.ipynb"))


if __name__ == "__main__":
    main()
