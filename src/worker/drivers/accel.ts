// Which QEMU accelerator a worker uses: KVM only when it is real hardware virtualisation, else TCG.
import { accessSync, constants as fsConstants, existsSync, readFileSync } from 'node:fs';

export type Accel = 'kvm' | 'tcg';

/**
 * KVM only when it is real hardware virtualisation: /dev/kvm writable, vmx/svm in the CPU flags and
 * no kvm_pvm module (a software KVM that boots stock kernels far slower than TCG). Else TCG.
 */
export function detectAccel(): { accel: Accel; reason: string } {
  try {
    accessSync('/dev/kvm', fsConstants.R_OK | fsConstants.W_OK);
  } catch {
    return { accel: 'tcg', reason: '/dev/kvm is missing or not writable' };
  }
  let cpuinfo = '';
  try {
    cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    // leave empty: no flags known
  }
  if (!/^flags\s*:.*\b(vmx|svm)\b/m.test(cpuinfo)) {
    return { accel: 'tcg', reason: 'the CPU shows no hardware virtualisation (vmx/svm)' };
  }
  if (existsSync('/sys/module/kvm_pvm')) {
    return { accel: 'tcg', reason: '/dev/kvm is a software KVM (kvm_pvm), slower than TCG' };
  }
  return { accel: 'kvm', reason: 'hardware virtualisation available' };
}
