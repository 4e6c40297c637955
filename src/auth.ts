/**
 * Who is calling: API keys, each naming a tenant. Routes ask `tenantOf(c)` for the caller's tenant; with
 * no key configured every caller is the one tenant "default".
 */
import type { Context, MiddlewareHandler } from "hono";
import { DEFAULT_TENANT } from "../runtime/index.ts";

export interface AuthOptions {
  /** A single key (tenant "default"), as --api-key gives. */
  apiKey?: string;
}

/** The tenant the authenticated request belongs to. */
export function tenantOf(c: Context): string {
  return (c.get("tenant" as never) as string | undefined) ?? DEFAULT_TENANT;
}

/** Refuses requests without a valid key (except /health) and records the caller's tenant. */
export function authMiddleware(options: AuthOptions): MiddlewareHandler {
  return async (c, next) => {
    if (options.apiKey && c.req.path !== "/health") {
      const header = c.req.header("authorization") ?? "";
      if (header !== `Bearer ${options.apiKey}`) {
        return c.json({ error: { message: "invalid or missing API key", type: "authentication_error", param: null, code: "invalid_api_key" } }, 401);
      }
    }
    c.set("tenant" as never, DEFAULT_TENANT as never);
    await next();
  };
}
