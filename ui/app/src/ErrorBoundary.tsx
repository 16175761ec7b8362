// The last resort: an error while rendering shows what broke and a way back, not a blank page (which a reload
// would show again, the route being in the URL).
import { Component, type ReactNode } from "react";

export class ErrorBoundary extends Component<{ children?: ReactNode }, { error: Error | null }> {
  override state: { error: Error | null } = { error: null };

  static getDerivedStateFromError(error: unknown): { error: Error } {
    return { error: error instanceof Error ? error : new Error(String(error)) };
  }

  private back = () => {
    location.hash = "#/";
    this.setState({ error: null });
  };

  override render() {
    if (!this.state.error) return this.props.children;
    return (
      <main className="signin">
        <div role="alert">
          <h1>Something went wrong</h1>
          <p className="error">{this.state.error.message}</p>
        </div>
        <button type="button" onClick={this.back}>
          Back to Generate
        </button>
      </main>
    );
  }
}
