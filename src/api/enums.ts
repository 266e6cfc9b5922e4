// The API's fixed lists of names, without the schemas (the CLI's start-up needs these, not TypeBox).
export const ROLES = ['compute:read', 'compute:write', 'compute:connect', 'admin:read', 'admin:write'] as const;
export type Role = (typeof ROLES)[number];

export const SCHEDULER_PROFILES = ['optimize-utilization', 'distribute-load'] as const;
