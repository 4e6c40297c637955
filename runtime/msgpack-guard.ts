/**
 * A structural check of untrusted msgpack bytes before msgpackr decodes them. msgpackr decodes extension
 * types into live objects (Date, Set, RegExp, Error, its own records); a snapshot needs none of them. This
 * walk accepts plain data only (nil, booleans, numbers, strings, binary, arrays, maps with string keys),
 * bounds nesting depth, and refuses any container that declares more elements than bytes remain, so a
 * few hostile bytes cannot make the decoder allocate gigabytes or recurse off the stack.
 */
export class MsgpackShapeError extends Error {}

export function assertPlainMsgpack(bytes: Uint8Array, maxDepth = 32): void {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 0;
  const need = (n: number) => {
    if (n < 0 || pos + n > bytes.length) throw new MsgpackShapeError(`value at byte ${pos} runs past the end of the data`);
  };
  const u8 = () => (need(1), view.getUint8(pos++));
  const u16 = () => (need(2), (pos += 2), view.getUint16(pos - 2));
  const u32 = () => (need(4), (pos += 4), view.getUint32(pos - 4));
  const skip = (n: number) => {
    need(n);
    pos += n;
  };
  const container = (count: number, perElement: number) => {
    // Every element takes at least one byte: a larger count is a lie meant to make the decoder allocate.
    if (count * perElement > bytes.length - pos) throw new MsgpackShapeError(`container at byte ${pos} declares ${count} elements, more than the bytes left`);
  };

  const value = (depth: number, asKey: boolean): void => {
    if (depth > maxDepth) throw new MsgpackShapeError(`nesting deeper than ${maxDepth}`);
    const at = pos;
    const b = u8();
    const isString = (b >= 0xa0 && b <= 0xbf) || b === 0xd9 || b === 0xda || b === 0xdb;
    if (asKey && !isString) throw new MsgpackShapeError(`map key at byte ${at} is not a string`);
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) return;
    if (b >= 0xa0 && b <= 0xbf) return skip(b & 0x1f);
    if (b >= 0x80 && b <= 0x8f) return map(b & 0x0f, depth);
    if (b >= 0x90 && b <= 0x9f) return array(b & 0x0f, depth);
    switch (b) {
      case 0xc4:
      case 0xd9:
        return skip(u8());
      case 0xc5:
      case 0xda:
        return skip(u16());
      case 0xc6:
      case 0xdb:
        return skip(u32());
      case 0xca:
        return skip(4);
      case 0xcb:
        return skip(8);
      case 0xcc:
      case 0xd0:
        return skip(1);
      case 0xcd:
      case 0xd1:
        return skip(2);
      case 0xce:
      case 0xd2:
        return skip(4);
      case 0xcf:
      case 0xd3:
        return skip(8);
      case 0xdc:
        return array(u16(), depth);
      case 0xdd:
        return array(u32(), depth);
      case 0xde:
        return map(u16(), depth);
      case 0xdf:
        return map(u32(), depth);
      default:
        throw new MsgpackShapeError(
          b === 0xc1 ? `reserved byte 0xc1 at ${at}` : `extension type (byte 0x${b.toString(16)} at ${at}) is not allowed in a snapshot`,
        );
    }
  };
  const array = (count: number, depth: number) => {
    container(count, 1);
    for (let i = 0; i < count; i++) value(depth + 1, false);
  };
  const map = (count: number, depth: number) => {
    container(count, 2);
    for (let i = 0; i < count; i++) {
      value(depth + 1, true);
      value(depth + 1, false);
    }
  };

  value(0, false);
  if (pos !== bytes.length) throw new MsgpackShapeError(`${bytes.length - pos} trailing bytes after the value`);
}
