"""A multi-turn chat through the model's chat template (the history is re-encoded every turn).

    python examples/chat.py --model Qwen3-30B-A3B-Q4_K_M.gguf          # scripted turns
    python examples/chat.py --model Qwen3-30B-A3B-Q4_K_M.gguf --interactive

Without --model it chats with the embedded Gemma-3-270M base model. Its GGUF carries no chat
template, so Gemma's turn format is set here (a 270M base model is no great talker).
"""

import argparse
import sys

import ferrum_mps
from ferrum_mps.default_model import default_model_path
from ferrum_mps.generation import generate_text

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a .gguf file (default: the embedded Gemma-3-270M Q4_K_M)")
parser.add_argument("--max-new-tokens", type=int, default=12)
parser.add_argument("--interactive", action="store_true", help="read your turns from stdin")
args = parser.parse_args()

path = args.model or default_model_path()
model = ferrum_mps.load_model(path)
tok = ferrum_mps.load_tokenizer(path)
if not tok.chat_template:
    if model.config.architecture != "gemma3":
        sys.exit(f"{path} has no chat template")
    tok.chat_template = GEMMA_TEMPLATE

turns = iter(sys.stdin.readline, "") if args.interactive else iter(["Hi! What is the capital of France?",
                                                                  "And of Italy?"])
history = []
for user in turns:
    user = user.strip()
    if not user:
        continue
    print(f"user: {user}\nassistant: ", end="", flush=True)
    r = generate_text(model, tok, user, chat=True, history=history, max_new_tokens=args.max_new_tokens)
    print(f"\n   [{r.new_tokens} tokens, {r.decode_tokens_per_s:.1f} tokens/s]")
    history += [{"role": "user", "content": user}, {"role": "assistant", "content": r.text.strip()}]
