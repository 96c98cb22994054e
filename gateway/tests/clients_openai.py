"""The official `openai` Python client, unchanged, against a vramd-gateway
app of kind "openai" in front of the fake OpenAI-compatible server (run by
tests/tests/gateway_openai.rs,
`the_official_openai_python_client_works_through_an_openai_app`).

Environment: GATEWAY_URL (the app's listen, http://host:port), MODEL, TOKENS
(the text every completion produces). Exits non-zero on the first failure.
"""

import os

import openai

url = os.environ["GATEWAY_URL"]
model = os.environ["MODEL"]
tokens = os.environ["TOKENS"]
msgs = [{"role": "user", "content": "hi"}]

oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
assert [m.id for m in oa.models.list()] == [model]
r = oa.chat.completions.create(model=model, messages=msgs)
assert r.choices[0].message.content == tokens, r
stream = oa.chat.completions.create(model=model, messages=msgs, stream=True)
text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
assert text == tokens, text
r = oa.completions.create(model=model, prompt="hi")
assert r.choices[0].text == tokens, r
e = oa.embeddings.create(model=model, input="x")
assert e.data[0].embedding == [0.1, 0.2, 0.3], e
try:
    oa.chat.completions.create(model="nope", messages=msgs)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as err:
    assert err.status_code == 404 and err.code == "model_not_found", err
print("ok")
