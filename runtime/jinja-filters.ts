/**
 * Filters Jinja2 has and @huggingface/jinja (0.5.11, the newest) lacks, which the chat templates of the
 * Llama family use: `select` and `reject` (Llama-3.1-Instruct's template renders its builtin tools with
 * `builtin_tools | reject('equalto', 'code_interpreter')`; without it every request that sets
 * builtin_tools got "Unknown ArrayValue filter: reject"). The library has no filter registry, so this
 * wraps its interpreter's applyFilter once (the package itself is not changed): a list given to one of
 * these filters is handled here, everything else goes to the library as before. Semantics are Jinja2's:
 * `select(test, *args)` keeps the items for which the named test passes (no test: the truthy items),
 * `reject` keeps the others; an unknown test is an error naming it.
 */
import { Interpreter } from "@huggingface/jinja";

/** The library's runtime values, as far as these filters touch them. */
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
interface Env {
  tests: Map<string, (...values: RuntimeValue[]) => boolean>;
}
type ApplyFilter = (this: InterpreterInternals, operand: RuntimeValue, filter: FilterNode, env: Env) => RuntimeValue;
interface InterpreterInternals {
  evaluateArguments(args: unknown[], env: Env): [RuntimeValue[], Map<string, RuntimeValue>];
}

const FILTERS = new Set(["select", "reject"]);
let installed = false;

/** Adds `select` and `reject` to @huggingface/jinja's interpreter (once per process). */
export function installJinjaFilters(): void {
  if (installed) return;
  installed = true;
  const proto = Interpreter.prototype as unknown as { applyFilter: ApplyFilter };
  const original = proto.applyFilter;
  proto.applyFilter = function (operand, filter, env) {
    const name = filter.type === "Identifier" ? filter.value : filter.type === "CallExpression" && filter.callee?.type === "Identifier" ? filter.callee.value : undefined;
    if (name === undefined || !FILTERS.has(name) || operand.type !== "ArrayValue") return original.call(this, operand, filter, env);
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
    const items = (operand.value as RuntimeValue[]).filter((item) => test(item) === keep);
    // A list of the same kind as the operand (the library's ArrayValue, whose class it does not export).
    const Ctor = (operand as unknown as { constructor: new (value: RuntimeValue[]) => RuntimeValue }).constructor;
    return new Ctor(items);
  };
}
