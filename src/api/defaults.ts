// What a VM is when its spec leaves something out, defined once for the controller, the worker, exec and
// the CLI (upstream's defaults: Tart's macOS images log in as admin/admin).
export const VM_DEFAULTS = {
  cpu: 4,
  /** MiB */
  memory: 8192,
  username: 'admin',
  password: 'admin',
} as const;

/** The guest port that reaches the VM's screen (VNC) through a tunnel, whatever the runtime. */
export const VNC_PORT = 5900;

/** SSH credentials of a VM: its own, or the defaults. */
export const sshCredentials = (vm: { username?: string; password?: string }) => ({
  username: vm.username || VM_DEFAULTS.username,
  password: vm.password || VM_DEFAULTS.password,
});
