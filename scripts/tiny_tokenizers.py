"""Tiny CLIP-style BPE and T5-style Unigram tokenizers, trained locally on a small corpus (the Hub is
unreachable here). Shared by the fixture scripts and the demo-model trainer."""

from tokenizers import Tokenizer, models, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, T5Tokenizer

CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "an astronaut riding a horse on the moon, digital art",
    "a red circle on a white background",
    "a blue square on a black background",
    "a green triangle on a gray background",
    "a yellow circle, a purple square and an orange triangle",
    "the quick brown fox jumps over the lazy dog",
    "watercolor painting of a lighthouse at sunset",
    "close-up portrait of an old man with a beard, 35mm photograph",
    "bad quality, blurry, low resolution, ugly",
    "café crème brûlée über naïve façade",
    "mountains, rivers, forests and cities at night under the stars",
]


def _words(corpus):
    return corpus * 20


def clip_tokenizer(pad_token="<|endoftext|>", vocab_extra=300):
    """CLIP tokenizer with CLIP's id layout: 256 byte symbols, the same with `</w>`, learned merges,
    then `<|startoftext|>` and `<|endoftext|>` last (so EOS has the highest id, as in the real vocab)."""
    base = CLIPTokenizer(model_max_length=77)
    tok = Tokenizer.from_str(base.backend_tokenizer.to_str())
    trainer = trainers.BpeTrainer(
        vocab_size=512 + vocab_extra,
        initial_alphabet=ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_words(CORPUS), trainer)
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    for m in merges:
        a, b = m.split(" ")
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if pad_token not in vocab:
        vocab[pad_token] = len(vocab)
    merges = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def t5_tokenizer(vocab_size=400, words=()):
    """T5 tokenizer: <pad>=0, </s>=1, <unk>=2, then a Unigram vocabulary trained on the shared corpus,
    then `words` as whole-word pieces (the demo's caption words: one token each); no extra ids."""
    tok = Tokenizer(models.Unigram())
    base = T5Tokenizer(extra_ids=0)
    tok.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_words(CORPUS), trainer)
    import json

    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    known = {v[0] for v in vocab}
    # A whole word scores far above any split of it, so the Unigram model keeps it whole.
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(words) if "\u2581" + w not in known]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


# Qwen3's chat template (the `chat_template` of the Qwen3 tokenizers, which FLUX.2 [klein] renders
# with `add_generation_prompt=True, enable_thinking=False`).
QWEN3_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if '</think>' in content %}\n"
    "            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def qwen_tokenizer(vocab_size=600):
    """Qwen2-style byte-level BPE (Qwen3's pre-tokenizer split pattern, no BOS/EOS added), trained on
    the shared corpus, with Qwen's special tokens after the vocabulary, `<|endoftext|>` as padding and
    Qwen3's chat template."""
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer(vocab={"a": 0}, merges=[])
    tok = Tokenizer.from_str(base.backend_tokenizer.to_str())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=ByteLevel.alphabet(), show_progress=False, special_tokens=[]
    )
    tok.train_from_iterator(_words(CORPUS) + ["user", "assistant", "system", "\n\n"], trainer)
    import json

    m = json.loads(tok.to_str())["model"]
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
    q = Qwen2Tokenizer(vocab=m["vocab"], merges=merges, unk_token=None, bos_token=None,
                       eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=512)
    q.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    q.chat_template = QWEN3_CHAT_TEMPLATE
    return q


# A Mistral-3.1-style chat template (system prompt block, [INST] turns whose content is a string or a
# list of text/image blocks, a default system message dated by `strftime_now`): the kind of template
# FLUX.2 [dev]'s tokenizer carries, written here for the tiny fixtures.
MISTRAL3_CHAT_TEMPLATE = (
    "{%- set today = strftime_now(\"%Y-%m-%d\") %}\n"
    "{%- set default_system_message = \"You are a tiny test model. Today is \" + today + \".\" %}\n"
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- if messages[0]['content'] is string %}\n"
    "        {%- set system_message = messages[0]['content'] %}\n"
    "    {%- else %}\n"
    "        {%- set system_message = messages[0]['content'][0]['text'] %}\n"
    "    {%- endif %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = default_system_message %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- '[INST]' + message['content'] + '[/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- '[INST]' }}\n"
    "            {%- for block in message['content'] %}\n"
    "                {%- if block['type'] == 'text' %}\n"
    "                    {{- block['text'] }}\n"
    "                {%- elif block['type'] in ['image', 'image_url'] %}\n"
    "                    {{- '[IMG]' }}\n"
    "                {%- else %}\n"
    "                    {{- raise_exception('Only text and image blocks are supported in message content!') }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "            {{- '[/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user, system and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                    "<pad>"]


def mistral_tokenizer(vocab_size=600, padding_side="left"):
    """A Tekken-like byte-level BPE with Mistral's control tokens first (`<s>` 1, `</s>` 2), padded on
    the left as Mistral's tokenizers are, with a Mistral-3.1-style chat template; adds no BOS of its
    own (the template writes it)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=MISTRAL_SPECIALS)
    tok.train_from_iterator(_words(CORPUS) + ["system", "model", "Today"], trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", padding_side=padding_side, model_max_length=512)
    t.add_special_tokens({"additional_special_tokens": MISTRAL_SPECIALS[3:8]})
    t.chat_template = MISTRAL3_CHAT_TEMPLATE
    return t
