// The web console's own endpoints (sign-in, the session, sign-out): what the browser sends and gets.
// Everything else the console does goes through the v1 API, with the session cookie for credentials.
import { Type, type Static } from '@sinclair/typebox';
import { Name } from './schemas.ts';
import { ROLES } from './enums.ts';

/** Where the console's endpoints and assets are, under the API prefix (the console itself is at `/`). */
export const CONSOLE_PATH = '/console';

export const ConsoleSignIn = Type.Object(
  {
    name: Name,
    token: Type.String({ minLength: 1, maxLength: 1024 }),
  },
  { additionalProperties: false, title: 'ConsoleSignIn' },
);
export type ConsoleSignIn = Static<typeof ConsoleSignIn>;

export const ConsoleSession = Type.Object(
  {
    account: Name,
    roles: Type.Array(Type.Union(ROLES.map((r) => Type.Literal(r)))),
    /** Sent back in the x-orchard-csrf header of every request that changes something. */
    csrf: Type.String(),
  },
  { additionalProperties: false, title: 'ConsoleSession' },
);
export type ConsoleSession = Static<typeof ConsoleSession>;
