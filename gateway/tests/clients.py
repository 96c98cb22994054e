"""The official `ollama` and `openai` Python clients, unchanged, against
vramd-gateway in front of the fake Ollama (run by tests/tests/gateway.rs,
`the_official_ollama_and_openai_python_clients_work_through_the_gateway`).

Environment: GATEWAY_URL (the app's listen, http://host:port), MODEL, TOKENS
(the text every generation produces). Exits non-zero on the first failure.
"""

import os

import ollama
import openai

url = os.environ["GATEWAY_URL"]
model = os.environ["MODEL"]
tokens = os.environ["TOKENS"]
msgs = [{"role": "user", "content": "hi"}]

c = ollama.Client(host=url)
assert c.generate(model=model, prompt="hi").response == tokens
streamed = list(c.generate(model=model, prompt="hi", stream=True))
assert "".join(p.response for p in streamed) == tokens, streamed
assert streamed[-1].done and streamed[-1].done_reason == "stop"
assert c.chat(model=model, messages=msgs).message.content == tokens
chat = "".join(p.message.content for p in c.chat(model=model, messages=msgs, stream=True))
assert chat == tokens, chat
assert [m.model for m in c.ps().models] == [model]
assert model in [m.model for m in c.list().models]
assert len(c.embed(model=model, input="x").embeddings) == 1
try:
    c.generate(model="nope", prompt="x")
    raise AssertionError("an unknown model must fail")
except ollama.ResponseError as e:
    assert e.status_code == 404 and "not found" in e.error, e

oa = openai.OpenAI(base_url=url + "/v1", api_key="ollama", max_retries=0)
r = oa.chat.completions.create(model=model, messages=msgs)
assert r.choices[0].message.content == tokens, r
stream = oa.chat.completions.create(model=model, messages=msgs, stream=True)
text = "".join(ch.choices[0].delta.content or "" for ch in stream)
assert text == tokens, text
print("ok")
