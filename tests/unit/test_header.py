"""The p2p message header (encode/decode, no MPI) and the MPI tag rule."""

import numpy as np
import pytest
import torch

from hvdhybrid.comm.p2p import (
    HEADER_LEN,
    MAX_TENSORS,
    MsgKey,
    TransportError,
    decode_header,
    encode_header,
    make_tag,
)


def spec(t):
    return None if t is None else (t.dtype, t.requires_grad, tuple(t.shape))


MESSAGES = [
    (),
    (torch.zeros(3, 4),),
    (None,),
    (torch.zeros(2, 5, requires_grad=True), None, torch.zeros(7, dtype=torch.int64)),
    (torch.tensor(1.5, dtype=torch.bfloat16), torch.zeros(0, 3), torch.ones(2, 1, dtype=torch.bool)),
    (None, None, torch.zeros(1, 2, 3, 4, 5, 6, 7, 8, dtype=torch.float16)),
    tuple(torch.zeros(i) for i in range(MAX_TENSORS)),
    (torch.zeros(4, dtype=torch.complex64), torch.zeros(2, 2, dtype=torch.uint8),
     torch.zeros((), dtype=torch.int64), torch.zeros(0, dtype=torch.float64)),
]


@pytest.mark.parametrize("tensors", MESSAGES, ids=range(len(MESSAGES)))
def test_round_trip(tensors):
    h = encode_header(tensors)
    assert h.dtype == np.int64 and h.shape == (HEADER_LEN,)
    assert decode_header(h) == [spec(t) for t in tensors]


def test_golden_spec():
    got = decode_header(encode_header([torch.zeros(2, 3, requires_grad=True), None]))
    assert got == [(torch.float32, True, (2, 3)), None]


def test_header_survives_a_copy_through_bytes():
    h = encode_header([torch.zeros(5, 0, 2, dtype=torch.int32)])
    copy = np.frombuffer(h.tobytes(), dtype=np.int64)
    assert decode_header(copy) == [(torch.int32, False, (5, 0, 2))]


def test_too_many_tensors():
    encode_header([None] * MAX_TENSORS)
    with pytest.raises(TransportError, match="at most 16 tensors, got 17"):
        encode_header([None] * (MAX_TENSORS + 1))


def test_too_many_dims():
    with pytest.raises(TransportError, match="9-d"):
        encode_header([torch.zeros([1] * 9)])


def test_corrupt_count():
    h = np.zeros(HEADER_LEN, dtype=np.int64)
    for n in (-1, MAX_TENSORS + 1):
        h[0] = n
        with pytest.raises(TransportError, match="corrupt header"):
            decode_header(h)


def test_tags_distinct_and_non_negative():
    for num_edges in (1, 2, 3, 5):
        seen = {}
        for mb in range(12):
            for edge in range(num_edges):
                for direction in (0, 1):
                    for part in range(MAX_TENSORS + 1):
                        tag = make_tag(MsgKey(edge, mb, direction), part, num_edges)
                        assert tag >= 0
                        assert tag not in seen, (tag, seen.get(tag))
                        seen[tag] = (edge, mb, direction, part)
        # the tag space is dense: the largest tag is the count minus one
        assert max(seen) == len(seen) - 1


def test_tag_ignores_stage_labels():
    assert make_tag(MsgKey(1, 2, 1, 0, 3), 4, 3) == make_tag(MsgKey(1, 2, 1), 4, 3)
