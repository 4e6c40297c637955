/**
 * onnxruntime-web's WASM session.run finishes without ever giving the event loop a turn (its promise
 * settles in microtasks), so a generation loop that only awaits it would hold the loop for the whole
 * request: no SSE chunk reaches the socket, no other request is answered, no disconnect is noticed.
 * The loop therefore yields a macrotask turn per step. setImmediate (Node, Bun, Deno) costs microseconds;
 * MessageChannel is the web-standard fallback.
 */
type Immediate = (callback: () => void) => unknown;
const immediate = (globalThis as { setImmediate?: Immediate }).setImmediate;

let channelYield: (() => Promise<void>) | null = null;
function messageChannelYield(): () => Promise<void> {
  const channel = new MessageChannel();
  const queue: (() => void)[] = [];
  channel.port1.onmessage = () => queue.shift()?.();
  return () =>
    new Promise<void>((resolve) => {
      queue.push(resolve);
      channel.port2.postMessage(0);
    });
}

export function yieldToEventLoop(): Promise<void> {
  if (immediate) return new Promise<void>((resolve) => void immediate(resolve));
  channelYield ??= messageChannelYield();
  return channelYield();
}
