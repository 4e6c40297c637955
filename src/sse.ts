/**
 * Server-sent events as a web-standard Response. The producer gets `send` for JSON events; when the
 * client goes away (the body stream is cancelled or the request aborts), `abort` fires so generation stops.
 */
export function sseResponse(
  produce: (send: (data: unknown) => void) => Promise<void>,
  abort: AbortController,
  onError: (error: unknown) => unknown,
): Response {
  const encoder = new TextEncoder();
  let closed = false;
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      const write = (text: string) => {
        if (closed) return;
        try {
          controller.enqueue(encoder.encode(text));
        } catch {
          closed = true;
          abort.abort();
        }
      };
      const send = (data: unknown) => write(`data: ${JSON.stringify(data)}\n\n`);
      produce(send)
        .then(() => write("data: [DONE]\n\n"))
        .catch((error: unknown) => {
          // Headers are gone already: the error travels as an event, as OpenAI's API does mid-stream.
          if (!abort.signal.aborted) send(onError(error));
        })
        .finally(() => {
          if (closed) return;
          closed = true;
          try {
            controller.close();
          } catch {
            // already closed by a cancel
          }
        });
    },
    cancel() {
      closed = true;
      abort.abort();
    },
  });
  return new Response(body, {
    headers: {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      "x-accel-buffering": "no",
    },
  });
}
