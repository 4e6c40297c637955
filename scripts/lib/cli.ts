/** Small command-line helpers the scripts share. */

/** The flag's value as a positive integer, or a message naming the flag and exit status 2. */
export function positiveInt(name: string, v: string | undefined): number {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 1) {
    console.error(`--${name} must be a positive integer, got ${v}`);
    process.exit(2);
  }
  return n;
}
