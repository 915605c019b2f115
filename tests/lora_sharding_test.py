"""LoRA training sharded over data x fsdp x tensor equals one device, with the planned
adapter shardings. The check needs 8 fake CPU devices, so it runs lora_multidevice.py in a
subprocess."""

from tests import multidevice


def test_sharded_lora_steps_match_one_device():
  results = multidevice.run_checks('lora_multidevice.py')
  assert sorted(results) == ['data2_fsdp2_tensor2']
  assert results['data2_fsdp2_tensor2'] == 'ok', results['data2_fsdp2_tensor2']
