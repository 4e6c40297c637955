/**
 * Where @huggingface/jinja (0.5.11, the newest) and Python's Jinja2 part ways in what the chat templates of
 * the Llama family use, brought to Jinja2's behaviour by wrapping the library's interpreter once (the
 * package itself is not changed; it has no filter registry):
 *
 * - `select` and `reject`, which the library lacks (Llama-3.1-Instruct's template renders its builtin tools
 *   with `builtin_tools | reject('equalto', 'code_interpreter')`; without it every request that set
 *   builtin_tools got "Unknown ArrayValue filter: reject"). Jinja2's semantics: `select(test, *args)` keeps
 *   the items of any iterable (a list, the characters of a string, the keys of a mapping) for which the
 *   named test passes (no test: the truthy items), `reject` keeps the others; an unknown test is an error
 *   naming it.
 * - `+` between a string and a non-string: the library concatenates their text, Jinja2 raises Python's
 *   TypeError (Llama-3.1's template writes a builtin tool call's arguments with `arg_name + '="' + arg_val`,
 *   so a number there is an error in transformers, and now here too, instead of a prompt Python never renders).
 */
import { Environment, Interpreter } from "@huggingface/jinja";

/** The library's runtime values, as far as these wrappers touch them. */
interface RuntimeValue {
  type: string;
  value: unknown;
  __bool__(): { value: boolean };
}
interface FilterNode {
  type: string;
  value?: string;
  callee?: { type: string; value: string };
  args?: unknown[];
}
interface BinaryNode {
  type: string;
  operator: { value: string };
  left: unknown;
  right: unknown;
}
interface Env {
  tests: Map<string, (...values: RuntimeValue[]) => boolean>;
}
type ApplyFilter = (this: InterpreterInternals, operand: RuntimeValue, filter: FilterNode, env: Env) => RuntimeValue;
type Evaluate = (this: InterpreterInternals, node: unknown, env: Env) => RuntimeValue;
type EvaluateBinary = (this: InterpreterInternals, node: BinaryNode, env: Env) => RuntimeValue;
interface InterpreterInternals {
  evaluate: Evaluate;
  evaluateArguments(args: unknown[], env: Env): [RuntimeValue[], Map<string, RuntimeValue>];
}

const FILTERS = new Set(["select", "reject"]);
/** A node standing for a value already evaluated (the `+` wrapper hands both operands on without evaluating them twice). */
const EVALUATED = "UltralongEvaluatedValue";
let installed = false;

/** The library's list and string value classes (it does not export them): read off values it converted itself. */
function valueClasses(): { List: new (items: RuntimeValue[]) => RuntimeValue; Str: new (text: string) => RuntimeValue } {
  const env = new Environment() as unknown as { set(name: string, value: unknown): RuntimeValue };
  const list = env.set("probe", ["x"]);
  const ctor = (v: RuntimeValue) => (v as unknown as { constructor: unknown }).constructor;
  return { List: ctor(list) as never, Str: ctor((list.value as RuntimeValue[])[0]!) as never };
}

/** Python's name of a runtime value's type, for its TypeError messages. */
function pythonType(v: RuntimeValue): string {
  const names: Record<string, string> = {
    IntegerValue: "int",
    FloatValue: "float",
    BooleanValue: "bool",
    ArrayValue: "list",
    TupleValue: "tuple",
    ObjectValue: "dict",
    KeywordArgumentsValue: "dict",
    FunctionValue: "function",
  };
  return names[v.type] ?? v.type;
}

/** Brings @huggingface/jinja's interpreter to Jinja2's behaviour for select / reject and string `+` (once per process). */
export function installJinjaFilters(): void {
  if (installed) return;
  installed = true;
  const { List, Str } = valueClasses();
  const proto = Interpreter.prototype as unknown as { applyFilter: ApplyFilter; evaluate: Evaluate; evaluateBinaryExpression: EvaluateBinary };

  const originalFilter = proto.applyFilter;
  proto.applyFilter = function (operand, filter, env) {
    const name = filter.type === "Identifier" ? filter.value : filter.type === "CallExpression" && filter.callee?.type === "Identifier" ? filter.callee.value : undefined;
    if (name === undefined || !FILTERS.has(name)) return originalFilter.call(this, operand, filter, env);
    // What Python iterates over: a list's items, a string's characters (code points), a mapping's keys.
    let items: RuntimeValue[];
    if (operand.type === "ArrayValue" || operand.type === "TupleValue") items = operand.value as RuntimeValue[];
    else if (operand.type === "StringValue") items = [...(operand.value as string)].map((ch) => new Str(ch));
    else if (operand.type === "ObjectValue") items = [...(operand.value as Map<string, RuntimeValue>).keys()].map((k) => new Str(k));
    else return originalFilter.call(this, operand, filter, env);
    const [args] = filter.type === "CallExpression" ? this.evaluateArguments(filter.args ?? [], env) : [[] as RuntimeValue[]];
    const [testName, ...testArgs] = args;
    let test: (item: RuntimeValue) => boolean;
    if (testName === undefined) test = (item) => item.__bool__().value;
    else {
      if (testName.type !== "StringValue") throw new Error(`the test given to \`${name}\` must be a string`);
      const fn = env.tests.get(testName.value as string);
      if (!fn) throw new Error(`Unknown test: ${testName.value}`);
      test = (item) => fn(item, ...testArgs);
    }
    const keep = name === "select";
    return new List(items.filter((item) => test(item) === keep));
  };

  const originalEvaluate = proto.evaluate;
  proto.evaluate = function (node, env) {
    if ((node as { type?: string } | null)?.type === EVALUATED) return (node as { value: RuntimeValue }).value;
    return originalEvaluate.call(this, node, env);
  };

  const originalBinary = proto.evaluateBinaryExpression;
  proto.evaluateBinaryExpression = function (node, env) {
    if (node.operator.value !== "+") return originalBinary.call(this, node, env);
    const left = this.evaluate(node.left, env);
    const right = this.evaluate(node.right, env);
    const isString = (v: RuntimeValue) => v.type === "StringValue";
    // Undefined and none operands keep the library's own error.
    const absent = (v: RuntimeValue) => v.type === "UndefinedValue" || v.type === "NullValue";
    if (isString(left) !== isString(right) && !absent(left) && !absent(right)) {
      throw new TypeError(
        isString(left) ? `can only concatenate str (not "${pythonType(right)}") to str` : `unsupported operand type(s) for +: '${pythonType(left)}' and 'str'`,
      );
    }
    return originalBinary.call(this, { ...node, left: { type: EVALUATED, value: left }, right: { type: EVALUATED, value: right } }, env);
  };
}
