"""Deltas across the engine-core pipe rebuild exactly the cumulative outputs."""

from __future__ import annotations

import copy
import pickle

import pytest

from llmserve.engine.output_wire import OutputDecoder, OutputEncoder, WireCompletion, WireOutput
from llmserve.models.random_checkpoint import build_random_checkpoint
from llmserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from llmserve.tokenizer import Tokenizer


def _out(rid, texts, tokens, finished=False, logprobs=None):
    outputs = [CompletionOutput(i, t, list(ids), -1.5 if logprobs else None,
                                copy.deepcopy(logprobs[i]) if logprobs else None,
                                "length" if finished else None)
               for i, (t, ids) in enumerate(zip(texts, tokens))]
    metrics = RequestMetrics(10.0, 10.5, 11.0, 10.0 + len(tokens[0]), 20.0 if finished else None)
    return RequestOutput(rid, "prompt", [1, 2, 3], outputs, finished, num_cached_tokens=2,
                         metrics=metrics)


def _roundtrip(encoder, decoder, outs):
    return decoder.decode(pickle.loads(pickle.dumps(encoder.encode(outs))))


def test_growing_outputs_round_trip_and_send_only_the_new_part():
    enc, dec = OutputEncoder(), OutputDecoder()
    lp = [[{5: Logprob(-0.1, 1, "a")}], [{6: Logprob(-0.2, 1, "b")}]]
    first = _out("r", ["a", "b"], [[5], [6]], logprobs=lp)
    assert _roundtrip(enc, dec, [first]) == [first]
    lp2 = [lp[0] + [{7: Logprob(-0.3, 1, "c")}], lp[1] + [{8: Logprob(-0.4, 2, "d")}]]
    second = _out("r", ["ac", "bd"], [[5, 7], [6, 8]], logprobs=lp2)
    wire = enc.encode([second])
    out = WireOutput._make(wire[0])
    assert out.request_id == "r" and out.prompt is None  # sent once, with the first message
    comp = WireCompletion._make(out.completions[0])
    assert (comp.text_keep, comp.text_tail, comp.token_keep, comp.token_tail) == (1, "c", 1, [7])
    assert (comp.logprobs_keep, comp.logprobs_tail) == (1, [{7: Logprob(-0.3, 1, "c")}])
    assert dec.decode(wire) == [second]


def test_wire_tuples_follow_the_named_layouts_and_pickle_as_plain_tuples():
    enc = OutputEncoder()
    out = _out("r", ["ab"], [[5, 6]], finished=True)
    out.num_computed_prefill_tokens, out.num_computed_decode_tokens = 3, 2
    out.extra = {"k": 1}
    (wire,) = enc.encode([out])
    assert type(wire) is tuple and len(wire) == len(WireOutput._fields)
    named = WireOutput._make(wire)
    assert named._replace(completions=None) == WireOutput(
        "r", ("prompt", [1, 2, 3]), True, 2, (10.0, 10.5, 11.0, 12.0, 20.0), 3, 2, {"k": 1}, None)
    (comp,) = named.completions
    assert type(comp) is tuple
    assert WireCompletion._make(comp) == WireCompletion(0, 0, "ab", 0, [5, 6], 0, None, None,
                                                        "length", None, None)
    # No class reference in the pickle: the names cost nothing on the wire.
    assert b"WireOutput" not in pickle.dumps([wire]) and b"output_wire" not in pickle.dumps([wire])


def test_an_abort_error_crosses_the_pipe():
    enc, dec = OutputEncoder(), OutputDecoder()
    out = _out("r", [""], [[]])
    out.outputs[0].finish_reason, out.outputs[0].error = "abort", "grammar could not be compiled"
    out.finished = True
    (back,) = _roundtrip(enc, dec, [out])
    assert back == out and back.outputs[0].error == "grammar could not be compiled"


def test_rewritten_text_is_resent_whole():
    enc, dec = OutputEncoder(), OutputDecoder()
    _roundtrip(enc, dec, [_out("r", ["hello wor"], [[1, 2, 3]])])
    trimmed = _out("r", ["hello"], [[1, 2]], finished=True)
    assert _roundtrip(enc, dec, [trimmed]) == [trimmed]


def test_finished_requests_are_forgotten_on_both_sides():
    enc, dec = OutputEncoder(), OutputDecoder()
    _roundtrip(enc, dec, [_out("a", ["x"], [[1]]), _out("b", ["y"], [[2]])])
    _roundtrip(enc, dec, [_out("a", ["xz"], [[1, 3]], finished=True)])
    assert len(dec) == 1 and list(enc._sent) == ["b"]


def test_decoded_outputs_are_not_mutated_by_later_steps():
    enc, dec = OutputEncoder(), OutputDecoder()
    (early,) = _roundtrip(enc, dec, [_out("r", ["a"], [[1]])])
    _roundtrip(enc, dec, [_out("r", ["ab"], [[1, 2]])])
    assert early.outputs[0].token_ids == [1] and early.outputs[0].text == "a"


def test_outputs_without_metrics_round_trip():
    enc, dec = OutputEncoder(), OutputDecoder()
    out = RequestOutput("m", None, [4], [CompletionOutput(0, "", [], None, None, None)], False)
    assert _roundtrip(enc, dec, [out]) == [out]


@pytest.fixture(scope="module")
def cl100k(tmp_path_factory) -> Tokenizer:
    path = build_random_checkpoint(tmp_path_factory.mktemp("cl100k"), "llama", tokenizer="cl100k",
                                   hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    return Tokenizer.from_pretrained(path)


def _tokens_only(rid, tokens, finish_reason=None):
    """An output as the engine core sends it for a request without stop strings: no text."""
    return RequestOutput(rid, None, [7, 8], [CompletionOutput(0, "", list(tokens), None, None,
                                                              finish_reason)],
                         finish_reason is not None)


def test_frontend_builds_the_text_of_token_only_outputs(cl100k):
    byte_token = {cl100k.token_bytes(i): i for i in range(256)}
    e2, x82, xac = (byte_token[b] for b in (b"\xe2", b"\x82", b"\xac"))
    ok = cl100k.encode("ok")
    enc, dec = OutputEncoder(), OutputDecoder()
    dec.detokenize("r", [7, 8], cl100k, skip_special_tokens=True)
    (first,) = _roundtrip(enc, dec, [_tokens_only("r", [e2, x82])])
    assert first.outputs[0].text == ""  # half a euro sign is held back
    # Generation ends on a lead byte: it shows as U+FFFD, as a full decode shows it.
    (last,) = _roundtrip(enc, dec, [_tokens_only("r", [e2, x82, xac, *ok, e2], "length")])
    assert last.outputs[0].text == cl100k.decode([e2, x82, xac, *ok, e2]) == "€ok\ufffd"
    assert len(dec) == 0


def test_frontend_text_leaves_out_a_stop_token_and_survives_a_rewrite(cl100k):
    hello, world = cl100k.encode("hello"), cl100k.encode(" world")
    eos = cl100k.encode("<|im_end|>", add_special_tokens=True)
    enc, dec = OutputEncoder(), OutputDecoder()
    dec.detokenize("s", [7, 8], cl100k, skip_special_tokens=False)
    _roundtrip(enc, dec, [_tokens_only("s", hello + world)])
    (rewritten,) = _roundtrip(enc, dec, [_tokens_only("s", hello)])  # the past shrank
    assert rewritten.outputs[0].text == "hello"
    (done,) = _roundtrip(enc, dec, [_tokens_only("s", hello + world + eos, "stop")])
    assert done.outputs[0].text == "hello world"  # the stop token adds no text
