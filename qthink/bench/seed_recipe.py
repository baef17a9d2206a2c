"""The seed's published usage code (model card, "Usage"), kept as the reference the batched loop must match.

Only changes: it is a function over a loaded model/tokenizer/head instead of a script, `K` and the token
budget are parameters, and it returns token ids. The per-step calls are the card's, one question at a
time, full-vocabulary logits at every step, `past_key_values` as published.
"""

import warnings

import torch


def seed_generate(model, tokenizer, proj, question: str, latent_steps: int = 6, max_new_tokens: int = 2048) -> list[int]:
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers >= 5.24 renamed past_key_values
        # Step 1: Process prompt
        out = model(**inputs, output_hidden_states=True, use_cache=True)
        past_kv = out.past_key_values
        latent = out.hidden_states[-1][:, -1, :]
        # Step 2: K latent reasoning steps
        mask = inputs["attention_mask"].clone()
        for _k in range(latent_steps):
            latent = proj(latent)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = model(inputs_embeds=latent.unsqueeze(1), attention_mask=mask,
                        past_key_values=past_kv, output_hidden_states=True, use_cache=True)
            past_kv = out.past_key_values
            latent = out.hidden_states[-1][:, -1, :]
        # Step 3: Greedy decode answer
        next_token = out.logits[:, -1, :].argmax(dim=-1)
        tokens = [next_token]
        eos_id = tokenizer.eos_token_id
        for _ in range(max_new_tokens - 1):
            if next_token.item() == eos_id:
                break
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = model(input_ids=next_token.unsqueeze(0), attention_mask=mask,
                        past_key_values=past_kv, use_cache=True)
            past_kv = out.past_key_values
            next_token = out.logits[:, -1, :].argmax(dim=-1)
            tokens.append(next_token)
    return torch.cat(tokens).tolist()
