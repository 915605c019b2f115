"""tools.hlo_collectives on hand-written HLO: the three replica-group forms, megascale
transfers, the cost model, and collectives inside while loops (trip counts from
known_trip_count, from the loop condition, or unknown)."""

import pytest

from vdit_jax.tools import hlo_collectives as hlo

# 8 devices: ids 0-3 on slice 0, 4-7 on slice 1.
SLICE_OF = [0, 0, 0, 0, 1, 1, 1, 1]
ACROSS = [[0, 4], [1, 5], [2, 6], [3, 7]]
WITHIN = [[0, 1, 2, 3], [4, 5, 6, 7]]

ADD = """
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}
"""


@pytest.mark.parametrize('attrs, groups', [
    ('replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true', WITHIN),
    ('replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add', ACROSS),
    ('replica_groups={}, to_apply=%add', [list(range(8))]),
    ('to_apply=%add', [list(range(8))]),
    ('replica_groups=[2,4]<=[8], use_global_device_ids=true', WITHIN),
    ('replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true', ACROSS),
    ('replica_groups=[1,8]<=[8], to_apply=%add', [list(range(8))]),
    ("replica_groups=mesh['a'=2,'b'=4] {'a'}, use_global_device_ids=true", ACROSS),
    ("replica_groups=mesh['a'=2,'b'=4] {'b'}, to_apply=%add", WITHIN),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}, to_apply=%add",
     ACROSS),
    ("replica_groups=mesh['x'=8] {'x':(1)2}, to_apply=%add", ACROSS),   # major factor 2
    ("replica_groups=mesh['x'=8] {'x':(2)4}, to_apply=%add", WITHIN),   # minor factor 4
    ("replica_groups=mesh['a'=2,'b'=4], device_ids=([2,4]<=[4,2]T(1,0)) {'b'}, to_apply=%add",
     [[0, 2, 4, 6], [1, 3, 5, 7]]),
])
def test_replica_groups_in_every_text_form(attrs, groups):
  assert hlo.replica_groups(attrs, 8) == groups


@pytest.mark.parametrize('shape, size', [
    ('f32[16,8,128]{2,1,0:T(8,128)}', 16 * 8 * 128 * 4),
    ('(bf16[4,2]{1,0}, u32[], token[])', 4 * 2 * 2 + 4),
    ('pred[3]', 3), ('s4[3]', 2), ('f32[]', 4), ('token[]', 0),
])
def test_shape_bytes(shape, size):
  assert hlo.shape_bytes(shape) == size


GROUPS_HLO = """HloModule groups, entry_computation_layout={(f32[256]{0})->f32[256]{0}}, num_partitions=8
""" + ADD + """
ENTRY %main (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  %in_slice = f32[256]{0} all-reduce(%p), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %across = f32[256]{0} all-reduce(%in_slice), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
  %everyone = f32[256]{0} all-reduce(%across), channel_id=3, replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add
  %piece = f32[64]{0} slice(%everyone), slice={[0:64]}
  %gathered = f32[128]{0} all-gather(%piece), channel_id=4, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true
  %scattered = f32[128]{0} reduce-scatter(%everyone), channel_id=5, replica_groups=mesh['a'=2,'b'=4] {'a'}, dimensions={0}, use_global_device_ids=true, to_apply=%add
  %permute-start = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%everyone), channel_id=6, source_target_pairs={{0,4},{4,0}}
  %permute-done = f32[256]{0} collective-permute-done(%permute-start)
  %local-start = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%permute-done), channel_id=7, source_target_pairs={{0,1},{1,0}}
  ROOT %local-done = f32[256]{0} collective-permute-done(%local-start)
}
"""


def test_collectives_whose_groups_span_slices_are_priced():
  traffic = hlo.dcn_traffic(GROUPS_HLO, SLICE_OF)
  sent = {t.name: (t.kind, t.slices, t.bytes_per_device) for t in traffic.transfers}
  assert sent == {
      # 1024 B all-reduced between 2 slices, one device a slice: 2 (2-1)/2 x 1024.
      'across': ('all-reduce', 2, 1024),
      # Over all 8: in-slice reduce-scatter first, then 1024/4 per device over DCN.
      'everyone': ('all-reduce', 2, 256),
      # Each device's 256 B piece goes to the other slice.
      'gathered': ('all-gather', 2, 256),
      # (2-1)/2 x 1024 B input, one device a slice.
      'scattered': ('reduce-scatter', 2, 512),
      'permute-start': ('collective-permute', 2, 1024),
  }
  assert traffic.bytes_per_device == 1024 + 256 + 256 + 512 + 1024
  assert traffic.loops == [] and traffic.loop_summary().startswith('no cross-slice')


def test_one_slice_or_a_per_slice_program_crosses_nothing():
  assert hlo.dcn_traffic(GROUPS_HLO, [0] * 8).bytes_per_device == 0
  assert hlo.dcn_traffic(GROUPS_HLO, None).transfers == []
  # Compiled per slice (libtpu's multi-slice programs): the ids are within a slice.
  per_slice = hlo.dcn_traffic(GROUPS_HLO, SLICE_OF * 2)
  assert per_slice.transfers == [] and 'stay in a slice' in per_slice.notes[0]


MEGASCALE_HLO = """HloModule megascale, num_partitions=4

ENTRY %main.1_spmd (p: f32[4,128]) -> f32[4,128] {
  %p = f32[4,128]{1,0:T(4,128)} parameter(0)
  %half = f32[2,128]{1,0} slice(%p), slice={[0:2], [0:128]}
  %zero-crop = f32[4,128]{1,0:T(4,128)} custom-call(%half), custom_call_target="ZeroCrop", backend_config={"flag_configs":[]}
  %padded = f32[4,128]{1,0:T(4,128)} bitcast(%zero-crop)
  %after-all = token[] after-all(), frontend_attributes={MegascaleRendezvousKeyName="all-reduce.1_0"}
  %send = (f32[4,128]{1,0:T(4,128)}, u32[], token[]) send(%padded, %after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.1_0",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}, backend_config={"flag_configs":[]}
  %recv = (f32[4,128]{1,0:T(4,128)}, u32[], token[]) recv(%after-all), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send-done = token[] send-done(%send), channel_id=2, is_host_transfer=true
  %after-all.1 = token[] after-all()
  %send.1 = (f32[4,128]{1,0}, u32[], token[]) send(%p, %after-all.1), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target={{100000,200000,300000,400000},{100001,200001,300001,400001}},_xla_megascale_transfer_type="ALL_GATHER"}
  %send-done.1 = token[] send-done(%send.1), channel_id=4, is_host_transfer=true
  %local = f32[4,128]{1,0} all-reduce(%p), channel_id=5, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  ROOT %copy = f32[4,128]{1,0} copy(%local)
}
"""


def test_megascale_transfers_count_once_per_send():
  traffic = hlo.dcn_traffic(MEGASCALE_HLO, SLICE_OF)
  sent = {t.name: (t.kind, t.source, t.payload_bytes, t.slices, t.bytes_per_device,
                   t.data_bytes_per_device) for t in traffic.transfers}
  assert sent == {
      # 2 KiB share all-reduced between slices 1 and 2: 2 (2-1)/2 x 2048; half of it is
      # the zeros that ZeroCrop padded 1 KiB of data with.
      'send': ('all-reduce', 'megascale', 2048, 2, 2048, 1024),
      # A 2 KiB piece gathered from 4 slices: sent to each of the 3 others.
      'send.1': ('all-gather', 'megascale', 2048, 4, 3 * 2048, 3 * 2048),
  }
  assert traffic.bytes_per_device == 2048 + 3 * 2048
  assert traffic.data_bytes_per_device == 1024 + 3 * 2048
  assert traffic.bytes_by_dtype == {'f32': 2048 + 3 * 2048}


LOOPS_HLO = """HloModule loops, num_partitions=8
""" + ADD + """
%inner_body (ip: (s32[], f32[256])) -> (s32[], f32[256]) {
  %ip = (s32[], f32[256]{0}) parameter(0)
  %ii = s32[] get-tuple-element(%ip), index=0
  %ix = f32[256]{0} get-tuple-element(%ip), index=1
  %one = s32[] constant(1)
  %inext = s32[] add(%ii, %one)
  %ar_inner = f32[256]{0} all-reduce(%ix), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add
  ROOT %iout = (s32[], f32[256]{0}) tuple(%inext, %ar_inner)
}

%inner_cond (cp: (s32[], f32[256])) -> pred[] {
  %cp = (s32[], f32[256]{0}) parameter(0)
  %ci = s32[] get-tuple-element(%cp), index=0
  %limit = s32[] constant(4)
  ROOT %lt = pred[] compare(%ci, %limit), direction=LT
}

%outer_body (op: (s32[], f32[256])) -> (s32[], f32[256]) {
  %op = (s32[], f32[256]{0}) parameter(0)
  %oi = s32[] get-tuple-element(%op), index=0
  %ox = f32[256]{0} get-tuple-element(%op), index=1
  %start = s32[] constant(1)
  %start.copy = s32[] copy(%start)
  %init = (s32[], f32[256]{0}) tuple(%start.copy, %ox)
  %inner = (s32[], f32[256]{0}) while(%init), condition=%inner_cond, body=%inner_body
  %iy = f32[256]{0} get-tuple-element(%inner), index=1
  %ar_outer = f32[256]{0} all-reduce(%iy), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
  %one.1 = s32[] constant(1)
  %onext = s32[] add(%oi, %one.1)
  ROOT %oout = (s32[], f32[256]{0}) tuple(%onext, %ar_outer)
}

%outer_cond (q: (s32[], f32[256])) -> pred[] {
  %q = (s32[], f32[256]{0}) parameter(0)
  %qi = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(5)
  ROOT %qlt = pred[] compare(%qi, %n), direction=LT
}

%odd_body (rp: (s32[], f32[256])) -> (s32[], f32[256]) {
  %rp = (s32[], f32[256]{0}) parameter(0)
  %ri = s32[] get-tuple-element(%rp), index=0
  %rx = f32[256]{0} get-tuple-element(%rp), index=1
  %ar_odd = f32[256]{0} all-reduce(%rx), channel_id=3, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
  ROOT %rout = (s32[], f32[256]{0}) tuple(%ri, %ar_odd)
}

%odd_cond (rq: (s32[], f32[256])) -> pred[] {
  %rq = (s32[], f32[256]{0}) parameter(0)
  %rx.1 = f32[256]{0} get-tuple-element(%rq), index=1
  %r0 = f32[] constant(0)
  %rsum = f32[] reduce(%rx.1, %r0), dimensions={0}, to_apply=%add
  ROOT %rgt = pred[] compare(%rsum, %r0), direction=GT
}

ENTRY %main (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[256]{0}) tuple(%z, %x)
  %outer = (s32[], f32[256]{0}) while(%t), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  %odd = (s32[], f32[256]{0}) while(%outer), condition=%odd_cond, body=%odd_body
  ROOT %y = f32[256]{0} get-tuple-element(%odd), index=1
}
"""


def test_collectives_in_loops_count_once_per_iteration():
  traffic = hlo.dcn_traffic(LOOPS_HLO, SLICE_OF)
  runs = {t.name: (t.bytes_per_device, t.executions) for t in traffic.transfers}
  # outer: known_trip_count 5; inner: its condition, i < 4 from a copy of 1 (3 trips: XLA
  # starts a loop whose first iteration it peeled off at 1), inside outer; odd: a condition that is not a counter, counted once and reported.
  assert runs == {'ar_inner': (1024, 15), 'ar_outer': (1024, 5), 'ar_odd': (1024, 1)}
  assert traffic.bytes_per_device == 1024 * (15 + 5 + 1)
  assert traffic.loops == ['inner: 3 (loop condition)', 'odd: ? (unknown)',
                           'outer: 5 (known_trip_count)']
  assert traffic.unknown_loops == 1
  assert '1 with unknown trip count, counted once' in traffic.loop_summary()


def test_unreadable_replica_groups_are_a_clear_error():
  with pytest.raises(ValueError, match='cannot read replica groups'):
    hlo.replica_groups('replica_groups=<odd>', 8)
  with pytest.raises(ValueError, match=r"axis 'c' is not one of the mesh axes \['a', 'b'\]"):
    hlo.replica_groups("replica_groups=mesh['a'=2,'b'=4] {'c'}", 8)
